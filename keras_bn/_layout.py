"""How a batch-normalization layer lays out its input: the normalized
axes, the merged view its `keras.ops` path works on, and its mask.

The view merges every run of adjacent reduced axes, and every run of
adjacent normalized axes, into one axis: `(64, 32, 32, 64)` normalized on
its last axis is worked on as `(65536, 64)`, with the same numbers. The
plain view (`plain_view`) is the input itself, for backends that merge
adjacent axes in their own kernels.
"""

from typing import Any
from typing import NamedTuple

from keras import ops


def adjacent_runs(rank, normalized_axes):
    """`(normalized, axes)` for each run of adjacent axes of one kind."""
    runs = []
    for a in range(rank):
        normalized = a in normalized_axes
        if runs and runs[-1][0] == normalized:
            runs[-1][1].append(a)
        else:
            runs.append((normalized, [a]))
    return runs


def resolve_axes(axis, input_shape):
    """Sorted non-negative axes; checks range, repeats and known sizes."""
    rank = len(input_shape)
    given = axis if isinstance(axis, list) else [axis]
    for a in given:
        if not -rank <= a < rank:
            raise ValueError(
                f"Argument `axis` is out of range for inputs of rank {rank} "
                f"(allowed: {-rank} to {rank - 1}). Received: axis={axis!r}, "
                f"input_shape={tuple(input_shape)}"
            )
    axes = sorted(a % rank for a in given)
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"Argument `axis` names the same axis twice for inputs of rank "
            f"{rank}. Received: axis={axis!r}"
        )
    for a in axes:
        if input_shape[a] is None:
            raise ValueError(
                "A normalized axis must have a known size, since the layer "
                f"keeps statistics for each position on it. Axis {a} of "
                f"input_shape={tuple(input_shape)} is None. Received: "
                f"axis={axis!r}"
            )
    return axes


def view_sizes(x, groups):
    """The sizes of the merged view of `x` (`groups` from `adjacent_runs`)."""
    shape = ops.shape(x)
    sizes = []
    for _, group in groups:
        size = 1
        for a in group:
            size = size * shape[a]
        sizes.append(size)
    return sizes


def to_view(x, groups):
    """`x` with its runs of adjacent reduced or normalized axes merged."""
    return ops.reshape(x, view_sizes(x, groups))


def mask_to_view(mask, x, groups):
    """`mask` (broadcastable to `x`) in the merged view of `x`.

    A run whose mask sizes are all 1, or all those of `x`, merges as
    the input's does; otherwise (a mask broadcast along part of a run,
    or sizes unknown when traced) the mask is broadcast to `x` first.
    """
    if mask is None:
        return None
    x_sizes = view_sizes(x, groups)
    mask_shape = ops.shape(mask)
    sizes = []
    for (_, group), x_size in zip(groups, x_sizes):
        dims = [mask.shape[a] for a in group]
        if len(group) == 1:
            sizes.append(mask_shape[group[0]])
        elif all(d == 1 for d in dims):
            sizes.append(1)
        elif all(d is not None and d != 1 for d in dims):
            sizes.append(x_size)
        else:
            mask = ops.broadcast_to(mask, ops.shape(x))
            return ops.reshape(mask, x_sizes)
    return ops.reshape(mask, sizes)


class View(NamedTuple):
    """A tensor in its merged view, and the way back.

    Attributes:
        x: The merged view.
        axes: The reduced axes of the view.
        mask: The mask in the view, or `None`.
        groups: The runs of axes (`adjacent_runs`) of the input; `None`
            for a plain view, which is the input itself.
        shape: The input's shape.
        reduced: The reduced axes of the input.
    """

    x: Any
    axes: list
    mask: Any
    groups: list
    shape: Any
    reduced: list

    def of(self, value):
        """A statistic or weight (`keepdims` against the input, or a
        scalar) in the view."""
        if len(value.shape) == 0 or self.groups is None:
            return value
        return to_view(value, self.groups)

    def statistic(self, value):
        """A statistic of the view (`keepdims`, or a scalar) in the
        input's `keepdims` shape."""
        if len(value.shape) == 0 or self.groups is None:
            return value
        return ops.reshape(value, kept_shape(self.shape, self.reduced))

    def output(self, y):
        """A tensor like the view, in the input's shape."""
        if self.groups is None:
            return y
        return ops.reshape(y, self.shape)


def merged_view(x, axes, mask=None):
    """`x`, reduced over `axes`, with every run of adjacent reduced axes and
    every run of adjacent kept axes merged into one axis (see above)."""
    rank = len(x.shape)
    axes = sorted(a % rank for a in axes)
    groups = adjacent_runs(rank, [a for a in range(rank) if a not in axes])
    return View(
        x=to_view(x, groups),
        axes=[i for i, (kept, _) in enumerate(groups) if not kept],
        mask=mask_to_view(mask, x, groups),
        groups=groups,
        shape=ops.shape(x),
        reduced=axes,
    )


def plain_view(x, axes, mask=None):
    """`x` itself as a `View`, reduced over `axes`: for TensorFlow's own
    kernels, which merge adjacent axes themselves, the merged view's
    reshapes would only add ops to trace."""
    rank = len(x.shape)
    axes = sorted(a % rank for a in axes)
    return View(x=x, axes=axes, mask=mask, groups=None, shape=ops.shape(x),
                reduced=axes)


def kept_shape(shape, reduced):
    """`shape` with the `reduced` axes of size 1 (`keepdims=True`)."""
    return [1 if a in reduced else size for a, size in enumerate(shape)]


def kept_axes_span(rank, reduced):
    """`(start, stop)`: the kept axes, which must be adjacent, are `start`
    to `stop - 1`."""
    kept = [a for a in range(rank) if a not in reduced]
    return kept[0], kept[-1] + 1


def standardize_mask(mask, x, layer_name):
    """A mask of the rank of `x`, or a clear error if it cannot fit."""
    if mask is None:
        return None
    rank = len(x.shape)
    given_shape = tuple(mask.shape)
    if len(mask.shape) == rank - 1:
        mask = ops.expand_dims(mask, -1)
    if len(mask.shape) != rank or any(
        m is not None and d is not None and m not in (1, d)
        for m, d in zip(mask.shape, x.shape)
    ):
        raise ValueError(
            f"Layer '{layer_name}' received a mask that does not fit its "
            "inputs: the mask must have the inputs' shape without the "
            "last axis, or a shape broadcastable to the inputs. Received: "
            f"mask.shape={given_shape}, inputs.shape="
            f"{tuple(x.shape)}"
        )
    return mask
