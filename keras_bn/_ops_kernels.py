"""The `keras.ops` kernel: batch normalization on every backend.

The path every configuration can take (`_dispatch.OPS`): two-pass moments
(`_statistics.moments`) and `x * scale + offset`, on the merged view of the
input (`_layout.merged_view`), which XLA reduces faster than several axes,
with the same numbers, or with `merge_axes=False` on the input itself
(TensorFlow's kernels merge adjacent axes themselves). The gradient is the
framework's.

Like the other kernels (`_kernels` on TensorFlow, `_torch_kernels` on
torch), these are functions of tensors with one signature:

- `normalize(x, axes, mask, epsilon, scale, offset, moments=None)`:
  batch-normalizes `x` over its `axes`, leaving out the elements where
  `mask` is zero from the statistics, and returns
  `_statistics.Normalized(outputs, moments)`. `scale` and `offset`
  broadcast against `x` (`keepdims`), in the statistics dtype. Given
  `moments` (this batch's, from `moments`), it normalizes with them.
- `moments(x, axes, mask)`: the batch's `_statistics.Moments`, `keepdims`.
- `inference(x, axes, epsilon, scale, offset, mean, variance)`: `x`
  normalized with given statistics.
"""

from keras_bn import _layout
from keras_bn import _statistics


def moments(x, axes, mask=None, synchronized=False, merge_axes=True):
    """The batch's `Moments` of `x` over `axes`, `keepdims`; across
    replicas when `synchronized` (`_statistics.moments`)."""
    view = _view(x, axes, mask, merge_axes)
    return _kept(view, _view_moments(view, synchronized))


def normalize(
    x, axes, mask, epsilon, scale, offset, moments=None, synchronized=False,
    merge_axes=True,
):
    """Batch normalization of `x` over `axes` (see the module)."""
    view = _view(x, axes, mask, merge_axes)
    if moments is None:
        # The view's own moments serve the affine; only the returned ones
        # go back to the input's `keepdims` shape.
        mean, variance, count = _view_moments(view, synchronized)
        moments = _kept(view, (mean, variance, count))
    else:
        mean, variance = view.of(moments.mean), view.of(moments.variance)
    outputs = _normalized(view, mean, variance, epsilon, scale, offset)
    return _statistics.Normalized(outputs, moments)


def inference(
    x, axes, epsilon, scale, offset, mean, variance, merge_axes=True
):
    """`x` normalized with the given statistics (see the module)."""
    view = _view(x, axes, None, merge_axes)
    return _normalized(
        view, *_like(view, mean, variance), epsilon, scale, offset
    )


def _view(x, axes, mask, merge_axes):
    x = _statistics.in_statistics_dtype(x)
    if merge_axes:
        return _layout.merged_view(x, axes, mask)
    return _layout.plain_view(x, axes, mask)


def _view_moments(view, synchronized):
    """`(mean, variance, count)` of the view, in the view's shape."""
    return _statistics.moments(
        view.x, view.axes, view.mask, synchronized=synchronized
    )


def _normalized(view, mean, variance, epsilon, scale, offset):
    """The view normalized with `mean` and `variance` (in the view's shape)
    and the input's `scale` and `offset`, in the input's shape."""
    total_scale, total_offset = _statistics.affine(
        mean, variance, epsilon, *_like(view, scale, offset)
    )
    return view.output(view.x * total_scale + total_offset)


def _like(view, *values):
    """`values` (`keepdims` against the input) in `view`, in its dtype."""
    return [
        view.of(_statistics.cast(value, view.x.dtype)) for value in values
    ]


def _kept(view, moments):
    """`(mean, variance, count)` of the view as `Moments`, `keepdims`
    against the input."""
    return _statistics.Moments(*(view.statistic(v) for v in moments))
