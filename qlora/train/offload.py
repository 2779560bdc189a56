"""Gradient checkpointing with the checkpointed decoder layers' inputs kept in host memory.

With non-reentrant checkpointing the only activations a decoder layer keeps on the device are its
inputs, which the checkpoint saves through autograd's saved-tensor mechanism; at long sequences
they are what fills the device (32 layers x seq x hidden x 2 bytes: 8 GiB for an 8B model at 32k
tokens). Inside `with ActivationOffloader(model):` those saves go through pack/unpack hooks
(torch.autograd.graph.saved_tensors_hooks, PyTorch's extension point for this) that copy each
layer input to pinned host memory on a side stream during the forward, and copy it back on the
same side stream during the backward, one layer ahead of the recompute that needs it, so the
copies overlap compute. Tensors under `min_bytes`, and every tensor that is not a layer input,
stay on the device. The values are copied bit for bit: losses and gradients are unchanged. The
host buffers are page-locked once, at their exact size, and reused by every later step.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from qlora.lora import base_model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers checkpoints (GradientCheckpointingLayer), in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _first_tensor(output) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


class HostChunks:
    """Host buffers for the tensors one forward offloads, handed out in order and reused, chunk i
    for the i-th tensor, by every later forward (whose shapes repeat).

    A chunk is page-locked at its exact size with cudaHostRegister rather than taken from torch's
    pinned allocator, which rounds every block up to a power of two: a 2.8 GB layer input (342k
    tokens x 4096 x 2 bytes) would take 4 GB, and 32 of them more than a 128 GB host has.
    """

    def __init__(self, pin: bool):
        self.pin, self.chunks, self.cursor = pin, [], 0

    def start(self) -> None:
        self.cursor = 0

    def take(self, nbytes: int, stream: Optional[torch.cuda.Stream]) -> torch.Tensor:
        index, self.cursor = self.cursor, self.cursor + 1
        if index < len(self.chunks) and self.chunks[index].numel() >= nbytes:
            return self.chunks[index][:nbytes]
        if stream is not None and index < len(self.chunks):
            stream.synchronize()  # the chunk being replaced may still be read by a queued copy
        chunk = self._allocate(nbytes)
        self.chunks[index:index + 1] = [chunk]
        return chunk

    def _allocate(self, nbytes: int) -> torch.Tensor:
        chunk = torch.empty(nbytes, dtype=torch.uint8)
        if not self.pin:
            return chunk
        try:
            cudart = torch.cuda.cudart()
            registered = int(cudart.cudaHostRegister(chunk.data_ptr(), nbytes, 0)) == 0
        except (AttributeError, RuntimeError):
            registered = False
        if not registered:
            # Registration can fail (locked-memory limits): torch's pinned allocator still works.
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        # The finalizer holds the storage, so the pages are unregistered before they are freed.
        weakref.finalize(chunk, _unregister, cudart, chunk.untyped_storage())
        return chunk


def _unregister(cudart, storage) -> None:
    cudart.cudaHostUnregister(storage.data_ptr())


class _Offloaded:
    """One tensor in host memory, and its way back to the device."""

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor, stream: Optional[torch.cuda.Stream]):
        self.device, self.stream, self.on_device = tensor.device, stream, None
        self.host = host.view(tensor.dtype).view(tensor.shape)
        if stream is None:  # forced on CPU: a plain copy, to exercise the same bookkeeping
            self.host.copy_(tensor.detach())
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written on the compute stream
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
        # The compute stream may free the tensor once autograd drops it; its memory must not be
        # reused before the copy on the side stream has read it.
        tensor.record_stream(stream)

    def prefetch(self) -> None:
        if self.on_device is not None or self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            tensor = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            tensor.copy_(self.host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.on_device = (tensor, ready)

    def fetch(self) -> torch.Tensor:
        if self.stream is None:
            return self.host.clone()  # the chunk is reused by the next forward
        self.prefetch()
        tensor, ready = self.on_device
        self.on_device = None  # a second unpack copies again rather than pinning device memory
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        tensor.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return tensor


class ActivationOffloader:
    """Context manager for the forward pass: decoder-layer inputs go to host memory, come back in
    the backward one layer ahead of their recompute.

    model: a transformers model (PEFT-wrapped or not) with gradient checkpointing enabled.
    min_bytes: tensors smaller than this stay on the device (the copy would cost more than it saves).
    force: copy even tensors that are already in host memory (CPU); for tests of the mechanism.
    """

    def __init__(self, model: nn.Module, min_bytes: int = 1 << 20, force: bool = False):
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no checkpointed decoder layers (GradientCheckpointingLayer) "
                             "whose inputs could be offloaded; set trainer.activation_offload=false")
        self.min_bytes, self.force = min_bytes, force
        # Weak: the autograd graphs own the host copies; one still alive means its graph is too.
        self._offloaded: list[weakref.ref] = []  # this forward's, in order
        self._alive: weakref.WeakSet = weakref.WeakSet()  # every forward's
        self.offloaded_count = self.offloaded_bytes = 0  # of the last forward
        self._inputs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._by_id: dict[int, _Offloaded] = {}
        self._stream: Optional[torch.cuda.Stream] = None
        self.host_chunks: Optional[HostChunks] = None
        self._hooks = None
        # A layer's input is the embeddings' output or the previous layer's output; the last
        # layer's output feeds the final norm right before the backward starts, so it stays.
        producers = [base_model(model).get_input_embeddings(), *layers[:-1]]
        self._handles = [m.register_forward_hook(self._remember_output) for m in producers]

    def remove(self) -> None:
        """Detach the forward hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember_output(self, module, args, output) -> None:
        tensor = _first_tensor(output)
        if tensor is not None and self._hooks is not None:
            self._inputs[id(tensor)] = tensor

    def _wanted(self, tensor: torch.Tensor) -> bool:
        if self._inputs.get(id(tensor)) is not tensor:
            return False
        if tensor.numel() * tensor.element_size() < self.min_bytes:
            return False
        return tensor.device.type == "cuda" or self.force

    def _pack(self, tensor: torch.Tensor):
        if not self._wanted(tensor):
            return tensor
        if id(tensor) in self._by_id:  # saved twice in one forward: one host copy
            return self._by_id[id(tensor)]
        on_cuda = tensor.device.type == "cuda"
        if on_cuda and self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        if self.host_chunks is None:
            self.host_chunks = HostChunks(pin=on_cuda)
        stream, nbytes = (self._stream if on_cuda else None), tensor.numel() * tensor.element_size()
        offloaded = _Offloaded(tensor, self.host_chunks.take(nbytes, stream), stream)
        self._offloaded.append(weakref.ref(offloaded))
        self._alive.add(offloaded)
        self.offloaded_count += 1
        self.offloaded_bytes += nbytes
        self._by_id[id(tensor)] = offloaded
        return offloaded

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        # The backward visits layers last to first: start bringing back the layer before this one.
        position = next((i for i in range(len(self._offloaded) - 1, -1, -1) if self._offloaded[i]() is packed), None)
        previous = self._offloaded[position - 1]() if position else None
        if previous is not None:
            previous.prefetch()
        return packed.fetch()

    def __enter__(self) -> "ActivationOffloader":
        # The host chunks are reused only once no graph of an earlier forward can still unpack them
        # (after its backward, or once it is dropped); otherwise this forward takes new ones.
        if self.host_chunks is not None and not len(self._alive):
            self.host_chunks.start()
        self._offloaded, self._by_id = [], {}
        self.offloaded_count = self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._inputs.clear()
        self._by_id = {}  # the graph holds the offloaded copies; nothing here keeps tensor ids alive
