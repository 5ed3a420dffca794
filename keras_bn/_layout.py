"""How a batch-normalization layer lays out its input: the normalized
axes, the merged view its `keras.ops` path works on, and its mask.

The view merges every run of adjacent reduced axes, and every run of
adjacent normalized axes, into one axis: `(64, 32, 32, 64)` normalized on
its last axis is worked on as `(65536, 64)`, with the same numbers.
"""

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


def view_sizes(x, groups, lead=0):
    """The sizes of the merged view of `x` (`groups` from `adjacent_runs`).

    `lead` leading axes (the ghost-batch axis) are kept as they are.
    """
    shape = ops.shape(x)
    sizes = list(shape[:lead])
    for _, group in groups:
        size = 1
        for a in group:
            size = size * shape[a + lead]
        sizes.append(size)
    return sizes


def to_view(x, groups, lead=0):
    """`x` with its runs of adjacent reduced or normalized axes merged."""
    return ops.reshape(x, view_sizes(x, groups, lead))


def mask_to_view(mask, x, groups, lead=0):
    """`mask` (broadcastable to `x`) in the merged view of `x`.

    A run whose mask sizes are all 1, or all those of `x`, merges as
    the input's does; otherwise (a mask broadcast along part of a run,
    or sizes unknown when traced) the mask is broadcast to `x` first.
    """
    if mask is None:
        return None
    x_sizes = view_sizes(x, groups, lead)
    mask_shape = ops.shape(mask)
    sizes = list(mask_shape[:lead])
    for (_, group), x_size in zip(groups, x_sizes[lead:]):
        dims = [mask.shape[a + lead] for a in group]
        if len(group) == 1:
            sizes.append(mask_shape[group[0] + lead])
        elif all(d == 1 for d in dims):
            sizes.append(1)
        elif all(d is not None and d != 1 for d in dims):
            sizes.append(x_size)
        else:
            mask = ops.broadcast_to(mask, ops.shape(x))
            return ops.reshape(mask, x_sizes)
    return ops.reshape(mask, sizes)


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
