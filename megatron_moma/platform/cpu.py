"""Run the real megatron-core 0.16 code on CPU with the gloo backend.

Megatron-core assumes CUDA throughout. On a machine without CUDA, `activate()` makes the CPU play
the part of "the CUDA device", so that megatron-core's own tensor, sequence, pipeline, expert and
data parallelism and its distributed optimizer run unchanged on gloo. Nothing here runs when CUDA
is available: `activate()` is then a no-op and GPU code paths are never patched.

The patches come in three layers, each documented with the megatron-core places it covers:

1. `torch.cuda.current_device()` returns the CPU device. This covers the ~175
   `device=torch.cuda.current_device()` call sites (tensor_parallel/layers.py, mappings.py,
   moe/router.py, distributed/param_and_grad_buffer.py, utils.py GlobalMemoryBuffer, ...), including
   those inside autograd backward functions.
   `CudaDeviceAsCpu`, a TorchFunctionMode, turns every other request for a CUDA device into the
   CPU: the `device="cuda"` literals (pipeline_parallel/schedules.py `total_num_tokens`,
   optimizer/optimizer.py, clip_grads.py, grad_scaler.py, param_and_grad_buffer.py warm-up tensor,
   transformer/utils.py attention masks, rerun_state_machine.py), `.cuda()` calls
   (models/common/language_module.py tied embeddings under PP), `pin_memory=True`, and the
   tensor-type checks (`param.type() == 'torch.cuda.FloatTensor'` in optimizer/distrib_optimizer.py,
   optimizer.py and clip_grads.py): a CPU tensor reports the CUDA type name of its dtype.
   Like every TorchFunctionMode it is not seen by code that runs *inside* a torch call it
   intercepted (autograd's backward, for one); none of the places above runs there.
2. `torch.cuda` stand-ins: `current_device`, `set_device`, `synchronize`, streams and events
   (moe/token_dispatcher.py alltoall dispatcher, moe/shared_experts.py overlap,
   pipeline_parallel/p2p_communication.py) become no-ops, which is exact on CPU where every op
   runs in order; the CUDA RNG API is served by the CPU generator, which is the generator dropout
   and initialisation use on CPU (tensor_parallel/random.py `CudaRNGStatesTracker`,
   `model_parallel_cuda_manual_seed`, `_get_cuda_rng_state`, `_set_cuda_rng_state`).
3. Targeted fixes of megatron-core functions, listed in `_MEGATRON_PATCHES`; `check_targets()`
   verifies that every one of them still exists, so a megatron-core upgrade that moves one fails
   loudly instead of silently running unpatched code.
"""

import contextlib
import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_ACTIVE_MODE: Optional["CudaDeviceAsCpu"] = None

_CUDA_TENSOR_TYPES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    """True for every way torch lets a caller name a CUDA device: "cuda", "cuda:1", 0, torch.device."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaDeviceAsCpu(TorchFunctionMode):
    """Answers every torch call that asks for a CUDA device with the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            return _tensor_type_as_cuda(args, kwargs)
        if func is torch.Tensor.to:
            args = tuple(torch.device("cpu") if _is_cuda_device(a) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _tensor_type_as_cuda(args, kwargs):
    """`tensor.type()` names the CUDA type; `tensor.type('torch.cuda.X')` converts on the CPU."""
    tensor, target = args[0], (args[1] if len(args) > 1 else kwargs.pop("dtype", None))
    if target is None:
        return _CUDA_TENSOR_TYPES.get(tensor.dtype, tensor.type())
    if isinstance(target, str):
        target = target.replace("torch.cuda.", "torch.")
    return torch.Tensor.type(tensor, target, **kwargs)


class _NoOpStream:
    """Stand-in for torch.cuda.Stream and Event: CPU ops already run in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NoOpStream()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


_CURRENT_STREAM = _NoOpStream()
_CPU = torch.device("cpu")


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = None, graph_safe: bool = False):
    torch.set_rng_state(new_state)


_TORCH_CUDA_STAND_INS = {
    "current_device": lambda: _CPU,
    "set_device": lambda device: None,
    "synchronize": lambda device=None: None,
    "Stream": _NoOpStream,
    "Event": _NoOpStream,
    "current_stream": lambda device=None: _CURRENT_STREAM,
    "default_stream": lambda device=None: _CURRENT_STREAM,
    "stream": lambda stream=None: contextlib.nullcontext(),
    "manual_seed": _cpu_manual_seed,
    "manual_seed_all": _cpu_manual_seed,
    "get_rng_state": _cpu_get_rng_state,
    "set_rng_state": _cpu_set_rng_state,
}


@dataclass(frozen=True)
class MegatronPatch:
    """One replaced megatron-core attribute: where, with what, and why."""

    module: str
    attribute: str
    make_replacement: Callable[[Any], Any]
    reason: str
    may_be_missing: bool = False


def _rng_state_getter(original):
    return _cpu_get_rng_state


def _rng_state_setter(original):
    return _cpu_set_rng_state


def _te_general_gemm_absent(original):
    return None


def _split_sizes_to_host(original):
    """gloo's all_to_all_single takes split sizes as host integers, never as tensors."""

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _uneven_gather_by_padding(original):
    """gloo's all_gather needs equal sizes: pad every rank's rows to the largest, then trim."""

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(output_split_sizes)) <= 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([g[:n] for g, n in zip(gathered, output_split_sizes)], dim=0)

    return _gather_along_first_dim


def _torch_norm_with_sequence_parallel(original_new):
    """Torch norms are per token, so under SP they only need their weight grads summed over TP.

    `WrappedTorchNorm` refuses `sequence_parallel`; we build the norm as it would without SP and
    mark its parameters `sequence_parallel=True`, which makes megatron-core's
    `finalize_model_grads` all-reduce their gradients over the tensor-parallel group.
    """

    def __new__(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        config_without_sp = copy.copy(config)
        config_without_sp.sequence_parallel = False
        norm = original_new(cls, config_without_sp, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


def _adam_state_materialised_before_state_dict(original):
    """Without TE/apex, DistributedOptimizer.state_dict reads Adam's step from torch Adam's
    per-parameter state and asserts it is one value; that state is empty before the first step,
    which is when a resumed run builds the state dict it loads into. Give every parameter that
    has no state yet the state torch Adam would create on its first step (step 0, zero moments),
    with the step of the others when some have stepped."""

    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Adam):
            steps = [s["step"] for s in inner.state.values() if "step" in s]
            step = steps[0].clone() if steps else torch.tensor(0.0)
            for group in inner.param_groups:
                for param in group["params"]:
                    if not inner.state[param]:
                        inner.state[param] = {"step": step.clone(),
                                              "exp_avg": torch.zeros_like(param),
                                              "exp_avg_sq": torch.zeros_like(param)}
        return original(self)

    return state_dict


def _adam_step_kept_on_parameter_state_load(original):
    """Without TE/apex, DistributedOptimizer.load_state_dict puts Adam's step into torch Adam's
    per-parameter state (from the param groups), then the parameter-state load copies every key
    of that state from the checkpoint's per-parameter tensors, which hold no step (KeyError
    'step'). Keep the keys the checkpoint does not carry, and give each parameter its own step
    tensor: load_state_dict shares one among all, which torch Adam's in-place `step += 1` would
    then advance once per parameter (wrong bias correction after a resume)."""

    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                state["step"] = state["step"].clone()
            tensors = {**{k: v for k, v in state.items() if k not in tensors}, **tensors}
        return original(self, model_param, tensors)

    return set_states


_MEGATRON_PATCHES: List[MegatronPatch] = [
    MegatronPatch(
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        _rng_state_getter,
        "reads torch.cuda.default_generators, which a CPU build does not have",
    ),
    MegatronPatch(
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        _rng_state_setter,
        "writes torch.cuda.default_generators, which a CPU build does not have",
    ),
    MegatronPatch(
        "megatron.core.transformer.moe.moe_utils",
        "te_general_gemm",
        _te_general_gemm_absent,
        "RouterGatingLinearFunction reads te_general_gemm, undefined when Transformer Engine is "
        "absent (NameError on every MoE router)",
        may_be_missing=True,
    ),
    MegatronPatch(
        "megatron.core.transformer.moe.moe_utils",
        "maybe_move_tensor_to_cpu",
        _split_sizes_to_host,
        "only converts CUDA tensors, so alltoall split sizes reach gloo as tensors (TypeError)",
    ),
    MegatronPatch(
        "megatron.core.transformer.moe.token_dispatcher",
        "maybe_move_tensor_to_cpu",
        _split_sizes_to_host,
        "the alltoall dispatcher's own import of moe_utils.maybe_move_tensor_to_cpu",
    ),
    MegatronPatch(
        "megatron.core.tensor_parallel.mappings",
        "_gather_along_first_dim",
        _uneven_gather_by_padding,
        "uneven all_gather (MoE alltoall with expert-TP > 1) fails on gloo: invalid tensor size",
    ),
    MegatronPatch(
        "megatron.core.transformer.torch_norm",
        "WrappedTorchNorm.__new__",
        _torch_norm_with_sequence_parallel,
        "WrappedTorchNorm asserts `not config.sequence_parallel`",
    ),
    MegatronPatch(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.state_dict",
        _adam_state_materialised_before_state_dict,
        "asserts len(steps) == 1 without TE/apex when torch Adam has no state yet (loading a "
        "checkpoint into a fresh optimizer)",
    ),
    MegatronPatch(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._set_main_param_and_optimizer_states",
        _adam_step_kept_on_parameter_state_load,
        "KeyError 'step' loading a fully_reshardable checkpoint without TE/apex, and one step "
        "tensor shared by all parameters after the load",
    ),
]


def _resolve(patch: MegatronPatch):
    """Return (owner object, attribute name) of a patch target."""
    owner = importlib.import_module(patch.module)
    *path, name = patch.attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def check_targets() -> List[str]:
    """Names of patch targets that no longer exist in the installed megatron-core (empty if all do)."""
    missing = []
    for patch in _MEGATRON_PATCHES:
        try:
            owner, name = _resolve(patch)
        except (ImportError, AttributeError):
            missing.append(f"{patch.module}.{patch.attribute}")
            continue
        if not patch.may_be_missing and name not in vars(owner):
            missing.append(f"{patch.module}.{patch.attribute}")
    for name in _TORCH_CUDA_STAND_INS:
        if not hasattr(torch.cuda, name):
            missing.append(f"torch.cuda.{name}")
    return missing


def is_active() -> bool:
    return _ACTIVE_MODE is not None


def activate() -> bool:
    """Make megatron-core run on CPU. Returns True if the CPU platform is (now) active.

    A no-op returning False when CUDA is available. Idempotent. Call it before building models;
    processes forked after it inherit it.
    """
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is not None:
        return True
    missing = check_targets()
    if missing:
        raise RuntimeError(
            "megatron_moma.platform.cpu: these megatron-core/torch targets no longer exist, so the "
            f"CPU platform cannot be applied (megatron-core is pinned to 0.16.1): {missing}"
        )
    for name, stand_in in _TORCH_CUDA_STAND_INS.items():
        setattr(torch.cuda, name, stand_in)
    for patch in _MEGATRON_PATCHES:
        owner, name = _resolve(patch)
        setattr(owner, name, patch.make_replacement(vars(owner).get(name)))
    _ACTIVE_MODE = CudaDeviceAsCpu()
    _ACTIVE_MODE.__enter__()
    return True
