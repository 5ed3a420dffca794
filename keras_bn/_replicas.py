"""Sums across replicas and processes, for synchronized statistics.

A synchronized layer reduces its per-replica sums over the group that
`replica_context` names: a `tf.distribute` replica context on TensorFlow,
the default `torch.distributed` process group on PyTorch. On JAX there is
nothing to do: under `keras.distribution` one array spans every device and
process. `_statistics` holds the math; this module only moves sums.
"""

import functools

from keras import backend


def check_backend(synchronized):
    """Raises a `ValueError` for `synchronized=True` on a backend that
    cannot synchronize (NumPy, OpenVINO)."""
    if synchronized and backend.backend() not in ("tensorflow", "jax", "torch"):
        raise ValueError(
            "Argument `synchronized=True` needs the TensorFlow, JAX or "
            "PyTorch backend. Received: "
            f"synchronized={synchronized!r} with the "
            f"{backend.backend()} backend"
        )


def replica_context():
    """The group a synchronized layer reduces over, or `None`.

    On TensorFlow, the `tf.distribute` replica context when it has more
    than one replica; on PyTorch, the default `torch.distributed` process
    group when it is initialized with more than one process (one replica
    per process, as `torch.nn.SyncBatchNorm` assumes). `None` everywhere
    else, JAX included: under `keras.distribution` one array spans every
    device and process, so the reductions below already see the whole
    batch.
    """
    name = backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return None
        return ctx
    if name == "torch":
        from torch import distributed

        if (
            distributed.is_available()
            and distributed.is_initialized()
            and distributed.get_world_size() > 1
        ):
            return distributed.group.WORLD
    return None


def cross_replica_sum(tensors):
    """Sums each tensor of the list over all replicas (one collective).

    Differentiable: the gradient of each replica's input is the sum of the
    gradients that reach the result on every replica.
    """
    ctx = replica_context()
    if ctx is None:
        return tensors
    if backend.backend() == "torch":
        return _torch_all_reduce_sum(tensors)
    import tensorflow as tf

    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensors)


def _torch_all_reduce_sum(tensors):
    """`cross_replica_sum` over the default `torch.distributed` group."""
    import torch

    flat = torch.cat([torch.reshape(t, (-1,)) for t in tensors])
    flat = _torch_all_reduce()(flat)
    sizes = [t.numel() for t in tensors]
    return [
        torch.reshape(part, t.shape)
        for part, t in zip(torch.split(flat, sizes), tensors)
    ]


@functools.cache
def _torch_all_reduce():
    """A differentiable all-reduce sum over the default process group.

    `torch.distributed.nn.functional.all_reduce` does the same, but torch
    2.13 deprecates it (a `FutureWarning`) in favour of a private module;
    like `torch.nn.SyncBatchNorm`, keras_bn writes its own autograd
    function instead.
    """
    import torch
    from torch import distributed

    class AllReduceSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x = x.clone(memory_format=torch.contiguous_format)
            distributed.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            # Every process reads the sum, so each summand's gradient is
            # the sum of the gradients of all the processes.
            grad = grad.clone(memory_format=torch.contiguous_format)
            distributed.all_reduce(grad)
            return grad

    return AllReduceSum.apply
