"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), many per batch, on ``lora_shrink`` / ``lora_expand``.

An adapter is a small residual MLP applied to the output ``x [.., H]`` of a sub-layer:

    adapter(x) = x + scaling * (W_up act(W_down x + b_down) + b_up)

with ``W_down [r, H]``, ``W_up [H, r]`` and ``W_up``/``b_up`` zero-initialised, so a new adapter is
the identity. Houlsby places one after the attention block and one after the feed-forward block of
every layer; Pfeiffer only after the feed-forward block.

Kernels: the two projections are the two halves of LoRA's kernel, ``lora_shrink`` (x -> rank space)
and ``lora_expand`` (rank space -> x's width, onto a base), so a batch whose rows use different
adapters (of different bottleneck sizes, or none) is one call per projection, forward and backward:

    h   = lora_shrink(x, W_down, index, ranks=r)                                # [N, R] fp32, 0 beyond r_t
    out = lora_expand(act(h + b_down[t]), W_up, index, scaling, ranks=r, base=x + scaling[t] b_up[t])

The rank mask makes the padding of smaller adapters cost nothing and read nothing, and rows with
index ``-1`` get ``base = x``: they pass through unchanged. The per-row bias gathers read a bias
table with one extra zero row, which index ``-1`` selects.

Placement (forward hooks on existing modules, no model code copied; :data:`FAMILIES`):

- Llama-style layouts (Llama, Mistral, Qwen2, Gemma, Phi-3, ...; also ViT as transformers 5.2x
  names it, ``layers.N.attention.o_proj``): the output of ``layers.N.self_attn.o_proj`` (or
  ``.attention.o_proj``) and of ``layers.N.mlp`` (pre-norm blocks: the adapter output goes straight
  into the residual add);
- GPT-2: the output of ``h.N.attn.c_proj`` and ``h.N.mlp.c_proj`` (before the residual dropout and
  the residual add);
- BERT-style encoders (BERT, RoBERTa, ELECTRA, older ViT naming, ...): the output of
  ``layer.N.attention.output.dense`` and ``layer.N.output.dense``, i.e. before the residual
  LayerNorm, where Houlsby placed it. The sub-layer's dropout then acts on the adapter's output
  too (identical in eval; in training the adapter sits inside the dropout rather than after it).

Other architectures raise a ValueError; pass ``attn_modules=`` / ``ffn_modules=`` (module names,
PEFT-style suffixes, or a full-match regex) to place adapters on any modules whose output is
``[..., H]`` (or a tuple whose first element is).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import lora_expand, lora_shrink
from .geometry import model_device
from .lora import AdapterRouting
from .selection import name_matches, per_row

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}

PLACEMENTS = ("houlsby", "pfeiffer")

# name, attention-site regex, feed-forward-site regex (full match on module names)
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("llama", r"(.*\.)?layers\.\d+\.(self_attn|attention)\.o_proj", r"(.*\.)?layers\.\d+\.mlp"),
    ("gpt2", r"(.*\.)?h\.\d+\.attn\.c_proj", r"(.*\.)?h\.\d+\.mlp\.c_proj"),
    ("bert", r"(.*\.)?layer\.\d+\.attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense"),
)

ModuleSpec = Union[None, str, Sequence[str]]


def _match(model: nn.Module, spec: Union[str, Sequence[str]]) -> list[str]:
    """Module names matching ``spec``: a full-match regex (str) or names / ``.``-suffixes (list)."""
    found = []
    for name, _ in model.named_modules():
        if not name:
            continue
        if name_matches(name, spec):
            found.append(name)
    return found


def find_sites(model: nn.Module, placement: str = "houlsby", attn_modules: ModuleSpec = None,
               ffn_modules: ModuleSpec = None) -> dict[str, list[str]]:
    """``{"attn": [...], "ffn": [...]}``: the module names whose outputs get an adapter.

    Semantics: with neither ``attn_modules`` nor ``ffn_modules`` given, the layout is detected from
    :data:`FAMILIES` (the first family whose patterns match the same, non-zero number of attention
    and feed-forward modules); otherwise only the given specs are used (a missing one means no
    adapters there). ``"pfeiffer"`` drops the attention sites. Raises ValueError when nothing is
    found, naming the model class and what was looked for.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: choose one of {', '.join(PLACEMENTS)}")
    if attn_modules is None and ffn_modules is None:
        for family, attn_re, ffn_re in FAMILIES:
            attn, ffn = _match(model, attn_re), _match(model, ffn_re)
            if ffn and len(attn) == len(ffn):
                break
        else:
            raise ValueError(
                f"cannot place bottleneck adapters in {type(model).__name__}: its module names match none of the "
                f"known layouts ({', '.join(f for f, _, _ in FAMILIES)}: e.g. layers.N.self_attn.o_proj + "
                "layers.N.mlp, h.N.attn.c_proj + h.N.mlp.c_proj, layer.N.attention.output.dense + "
                "layer.N.output.dense); pass attn_modules=[...] and ffn_modules=[...] (module names, suffixes "
                "or a regex) to say which modules' outputs get an adapter")
    else:
        attn = _match(model, attn_modules) if attn_modules is not None else []
        ffn = _match(model, ffn_modules) if ffn_modules is not None else []
        for what, spec, got in (("attn_modules", attn_modules, attn), ("ffn_modules", ffn_modules, ffn)):
            if spec is not None and not got:
                raise ValueError(f"{what}={spec!r} matched no module of {type(model).__name__}")
    if placement == "pfeiffer":
        attn = []
    if not attn and not ffn:
        raise ValueError(f"placement={placement!r} leaves no module for a bottleneck adapter in "
                         f"{type(model).__name__}: give ffn_modules=[...]")
    return {"attn": attn, "ffn": ffn}


def _output_width(model: nn.Module, module: nn.Module) -> int:
    for attr in ("out_features", "nf"):  # nn.Linear, transformers' Conv1D
        width = getattr(module, attr, None)
        if isinstance(width, int):
            return width
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is None:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}: it has no out_features and "
                         "the model's config no hidden_size")
    return int(hidden)


class BottleneckBank(nn.Module):
    """All adapters at one site: T bottleneck adapters over hidden size H, applied per row.

    Shapes: ``down`` [T, R, H], ``down_bias`` [T, R], ``up`` [T, H, R], ``up_bias`` [T, H]
    (R = the largest bottleneck size, zero-padded), ``ranks`` [T] int32 (0 = the adapter skips this
    site), ``scaling`` [T] fp32. ``forward(x [B, ..., H], index [B])`` -> [B, ..., H].
    Semantics: row b with slot t = index[b] >= 0 gets ``x + s_t (W_up act_t(W_down x + b_down) + b_up)``
    (first ranks[t] slots only); rows with -1, and slots of rank 0, get x exactly. Weights are
    kept in the bank's dtype; x is cast to it and the result back; the bottleneck activations are
    fp32 (fp64 for an fp64 bank). ``index`` must be validated by
    the caller (the ops run with ``validate=False``).
    """

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.hidden = hidden
        kw = dict(dtype=dtype, device=device)
        self.down = nn.Parameter(torch.zeros(0, 0, hidden, **kw))
        self.down_bias = nn.Parameter(torch.zeros(0, 0, **kw))
        self.up = nn.Parameter(torch.zeros(0, hidden, 0, **kw))
        self.up_bias = nn.Parameter(torch.zeros(0, hidden, **kw))
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("scaling", torch.zeros(0, dtype=torch.float32, device=device))
        self.register_buffer("kind", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.activations: list[str] = []
        self._ranks: list[int] = []  # host copy of ranks: no device reads in forward
        self._kinds: list[str] = []  # the distinct non-linearities of the live slots

    @property
    def num_slots(self) -> int:
        return self.down.shape[0]

    def _set(self, down: Tensor, down_bias: Tensor, up: Tensor, up_bias: Tensor, ranks: Tensor, scaling: Tensor) -> None:
        grad = self.down.requires_grad
        self.down = nn.Parameter(down.contiguous(), requires_grad=grad)
        self.down_bias = nn.Parameter(down_bias.contiguous(), requires_grad=grad)
        self.up = nn.Parameter(up.contiguous(), requires_grad=grad)
        self.up_bias = nn.Parameter(up_bias.contiguous(), requires_grad=grad)
        self.ranks, self.scaling = ranks, scaling

    def _refresh(self) -> None:
        self._kinds = sorted({a for a, r in zip(self.activations, self._ranks) if r})
        kinds = [self._kinds.index(a) if a in self._kinds else -1 for a in self.activations]
        self.kind = torch.tensor(kinds, dtype=torch.long, device=self.ranks.device)

    @torch.no_grad()
    def add_slot(self, weights: Optional[tuple[Tensor, Tensor, Tensor, Tensor]], scaling: float = 1.0,
                 activation: str = "relu") -> None:
        """Append one slot: ``weights`` = (down [r, H], down_bias [r], up [H, r], up_bias [H]) or None (rank 0)."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"non_linearity={activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        T, R, H = self.down.shape
        r = 0 if weights is None else weights[0].shape[0]
        if weights is not None:
            want = ((r, H), (r,), (H, r), (H,))
            if tuple(tuple(w.shape) for w in weights) != want:
                raise ValueError(f"bottleneck weights must be down [r, {H}], down_bias [r], up [{H}, r], up_bias [{H}], "
                                 f"got {[list(w.shape) for w in weights]}")
        R2 = max(R, r)
        down = self.down.new_zeros(T + 1, R2, H)
        down_bias = self.down.new_zeros(T + 1, R2)
        up = self.down.new_zeros(T + 1, H, R2)
        up_bias = self.down.new_zeros(T + 1, H)
        down[:T, :R], down_bias[:T, :R], up[:T, :, :R], up_bias[:T] = self.down, self.down_bias, self.up, self.up_bias
        if r:
            down[T, :r], down_bias[T, :r], up[T, :, :r], up_bias[T] = (w.to(down) for w in weights)
        ranks = torch.cat([self.ranks, self.ranks.new_tensor([r])])
        scales = torch.cat([self.scaling, self.scaling.new_tensor([float(scaling) if r else 0.0])])
        self._set(down, down_bias, up, up_bias, ranks, scales)
        self.activations.append(activation)
        self._ranks.append(r)
        self._refresh()

    @torch.no_grad()
    def remove_slot(self, slot: int) -> None:
        keep = [t for t in range(self.num_slots) if t != slot]
        self._ranks = [self._ranks[t] for t in keep]
        R = max(self._ranks, default=0)
        self._set(self.down[keep, :R], self.down_bias[keep, :R], self.up[keep, :, :R], self.up_bias[keep],
                  self.ranks[keep], self.scaling[keep])
        self.activations = [self.activations[t] for t in keep]
        self._refresh()

    def weights(self, slot: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(down [r, H], down_bias [r], up [H, r], up_bias [H]) of one slot (views into the bank)."""
        r = self._ranks[slot]
        return self.down[slot, :r], self.down_bias[slot, :r], self.up[slot, :, :r], self.up_bias[slot]

    def _activate(self, h: Tensor, index: Tensor) -> Tensor:
        kinds = self._kinds
        if len(kinds) <= 1:
            return ACTIVATIONS[kinds[0] if kinds else "identity"](h)
        # Adapters with different non-linearities in one bank: each row takes its own (-1 rows: any).
        row_kind = self.kind[index.long().clamp(min=0)].view(-1, *([1] * (h.dim() - 1)))
        out = h
        for k, name in enumerate(kinds):
            out = torch.where(row_kind == k, ACTIVATIONS[name](h), out)
        return out

    def forward(self, x: Tensor, index: Tensor, token_index: Optional[Tensor] = None) -> Tensor:
        """``x`` [B, ..., H], ``index`` [B]; ``token_index`` = ``index`` repeated per token ([B * L]),
        shared by every site of a batch (:meth:`AdapterRouting.token_index`), built here if None."""
        T, R, H = self.down.shape
        if x.shape[-1] != H:
            raise ValueError(f"bottleneck bank over H={H} got an output of shape {list(x.shape)}")
        B = x.shape[0]
        xf = x.to(self.down.dtype).reshape(B, -1, H)  # [B, L, H]: index [B] is per sequence
        L = xf.shape[1]
        if token_index is None:
            token_index = index if L == 1 else index[:, None].expand(B, L).reshape(B * L)
        live = (self.ranks > 0).to(self.down.dtype)[:, None]  # rank-0 slots: no bias, no gradient
        rows = index.long()  # -1 picks the appended zero row
        down_bias = torch.cat([self.down_bias * live, self.down_bias.new_zeros(1, R)])[rows]  # [B, R]
        up_bias = torch.cat([self.up_bias * (live * self.scaling.to(live)[:, None]), self.up_bias.new_zeros(1, H)])[rows]
        x2 = xf.reshape(B * L, H)
        h = lora_shrink(x2, self.down, token_index, ranks=self.ranks, validate=False)  # [B*L, R] fp32, 0 beyond r_t
        a = self._activate((h.view(B, L, R) + down_bias[:, None, :]).view(B * L, R), token_index)
        base = (xf + up_bias[:, None, :]).reshape(B * L, H)
        out = lora_expand(a, self.up, token_index, self.scaling, ranks=self.ranks, base=base, validate=False)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, hidden={self.hidden}, max_rank={self.down.shape[1]}"


def _bank_key(module_name: str) -> str:
    return module_name.replace(".", "__")


class BottleneckSites(nn.Module):
    """The bottleneck adapters of one model: a :class:`BottleneckBank` and a forward hook per
    site, one slot per adapter in every bank, routed by a shared :class:`AdapterRouting`.

    Semantics: hooks apply the current call's routing (``routing.use(index)``; outside a ``use``
    block, or with index None, every site is the identity). The model is referenced, not owned
    (its parameters are not this module's). ``configs[name]`` holds each adapter's settings.
    """

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        object.__setattr__(self, "model", model)
        self.adapter_dtype = adapter_dtype
        self.routing = AdapterRouting()
        self.banks = nn.ModuleDict()
        self.configs: dict[str, dict] = {}
        self._sites: dict[str, str] = {}  # bank key -> module name
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def names(self) -> list[str]:
        return list(self.routing.names)

    def _device(self):
        return model_device(self.model)

    def _hook(self, key: str):
        def hook(module: nn.Module, args, output):
            index = self.routing.index
            if index is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            B = index.shape[0]
            rows = hidden if hidden.shape[0] == B else hidden.reshape(B, -1, hidden.shape[-1])  # flattened (OPT)
            L = rows[0].numel() // rows.shape[-1]  # tokens per row
            out = self.banks[key](rows, index, self.routing.token_index(L)).reshape(hidden.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    def add(self, name: str, r: Optional[int] = None, *, reduction_factor: int = 16, placement: str = "houlsby",
            non_linearity: str = "relu", scaling: float = 1.0, attn_modules: ModuleSpec = None,
            ffn_modules: ModuleSpec = None, init_weights: bool = True,
            generator: Optional[torch.Generator] = None) -> dict:
        """Add a trainable adapter (see :meth:`BottleneckAdapterModel.add_adapter`); returns its settings."""
        if not name or not isinstance(name, str):
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={non_linearity!r}: choose one of {', '.join(ACTIVATIONS)}")
        sites = find_sites(self.model, placement, attn_modules, ffn_modules)
        targets = list(dict.fromkeys(sites["attn"] + sites["ffn"]))
        widths = {m: _output_width(self.model, self.model.get_submodule(m)) for m in targets}
        if r is None:
            r = max(1, min(widths.values()) // int(reduction_factor))
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"bottleneck size r must be an int >= 1, got {r!r}")
        device = self._device()
        for module_name in targets:  # new sites: a bank with rank-0 slots for the adapters already there
            key = _bank_key(module_name)
            if key not in self.banks:
                bank = BottleneckBank(widths[module_name], self.adapter_dtype, device)
                for _ in self.routing.names:
                    bank.add_slot(None)
                self.banks[key] = bank
                self._sites[key] = module_name
                self._handles[key] = self.model.get_submodule(module_name).register_forward_hook(self._hook(key))
        for key, bank in self.banks.items():
            module_name = self._sites[key]
            if module_name not in widths:
                bank.add_slot(None, activation=non_linearity)
                continue
            H = widths[module_name]
            bound = 1.0 / math.sqrt(H)
            down = torch.empty(r, H).uniform_(-bound, bound, generator=generator)
            if init_weights:
                down_bias, up, up_bias = torch.zeros(r), torch.zeros(H, r), torch.zeros(H)
            else:
                down_bias = torch.empty(r).uniform_(-bound, bound, generator=generator)
                up = torch.empty(H, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=generator)
                up_bias = torch.empty(H).uniform_(-bound, bound, generator=generator)
            bank.add_slot((down, down_bias, up, up_bias), scaling, non_linearity)
        self.routing.names.append(name)
        self.configs[name] = dict(r=r, placement=placement, non_linearity=non_linearity, scaling=float(scaling),
                                  modules=targets)
        return self.configs[name]

    def _known(self, name: str) -> int:
        if name not in self.configs:
            raise ValueError(f"unknown adapter {name!r}; loaded: {self.names}")
        return self.routing.names.index(name)

    def remove(self, name: str) -> None:
        """Remove an adapter's slot from every site (banks and hooks stay; other adapters are unchanged)."""
        slot = self._known(name)
        for bank in self.banks.values():
            bank.remove_slot(slot)
        self.routing.names.remove(name)
        del self.configs[name]

    def state_of(self, name: str) -> dict[str, Tensor]:
        """One adapter's weights: ``{"<module>.down" [r, H], ".down_bias" [r], ".up" [H, r], ".up_bias" [H]}``."""
        slot = self._known(name)
        state = {}
        for key, bank in self.banks.items():
            if bank._ranks[slot]:
                for part, w in zip(("down", "down_bias", "up", "up_bias"), bank.weights(slot)):
                    state[f"{self._sites[key]}.{part}"] = w.detach().clone()
        return state

    @torch.no_grad()
    def load_state(self, name: str, state: dict[str, Tensor]) -> None:
        """Copy :meth:`state_of` output into an adapter of the same configuration (exact keys, all
        shapes checked before anything is copied)."""
        want = self.state_of(name)
        if set(state) != set(want):
            raise ValueError(f"adapter {name!r} state keys differ: missing {sorted(set(want) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(want))}")
        for key, w in want.items():
            if state[key].shape != w.shape:
                raise ValueError(f"{key} is {list(state[key].shape)}, adapter {name!r} needs {list(w.shape)}")
        slot = self.routing.names.index(name)
        for key, bank in self.banks.items():
            if bank._ranks[slot]:
                for part, w in zip(("down", "down_bias", "up", "up_bias"), bank.weights(slot)):
                    w.copy_(state[f"{self._sites[key]}.{part}"])

    def index(self, names: Sequence[Optional[str]], device=None) -> Optional[Tensor]:
        """Slot index [rows] int32 (-1 = base model) of per-row names, or None when no row uses an adapter."""
        slots = [-1 if n is None else self.routing.names.index(n) for n in names]
        if max(slots, default=-1) < 0:
            return None
        return torch.tensor(slots, dtype=torch.int32, device=device or self._device())

    def detach(self) -> None:
        """Take every hook off (idempotent)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}


class BottleneckAdapterModel(nn.Module):
    """A transformers model with bottleneck adapters; rows of one batch may use different adapters.

    Shapes: ``forward(*args, adapter_names=..., **kwargs)`` runs the wrapped model unchanged in its
    inputs and outputs (``input_ids`` [B, L], ``pixel_values`` [B, ...], ...); the first tensor
    argument sets the batch size B.
    Semantics: ``adapter_names`` is a name or None per row (None = the base model for that row), one
    name for every row, or None = the only adapter loaded. The per-row slot index is built and checked
    once per call (:class:`AdapterRouting`, kept in the call), then every hooked site calls the ops
    with ``validate=False``. In train mode each adapter gets exactly the gradient of its own rows.
    The constructor freezes the base model (flags restored by :meth:`remove`); adapter weights are
    kept in ``adapter_dtype`` (fp32 by default).
    """

    def __init__(self, model: nn.Module, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.sites = BottleneckSites(model, adapter_dtype)
        self._saved_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)

    @property
    def adapters(self) -> list[str]:
        return self.sites.names

    @property
    def routing(self) -> AdapterRouting:
        return self.sites.routing

    @property
    def banks(self) -> nn.ModuleDict:
        return self.sites.banks

    @property
    def configs(self) -> dict[str, dict]:
        return self.sites.configs

    def add_adapter(self, name: str, r: Optional[int] = None, **kwargs) -> None:
        """Add a trainable adapter.

        Semantics: bottleneck size ``r`` (default ``hidden // reduction_factor``, at least 1);
        ``placement`` "houlsby" (after attention and after the feed-forward block) or "pfeiffer"
        (after the feed-forward block only); sites found by :func:`find_sites`
        (``attn_modules``/``ffn_modules`` override). Init: ``W_down`` as ``nn.Linear``
        (kaiming-uniform), biases 0, ``W_up`` 0 (the adapter starts as the identity);
        ``init_weights=False`` draws ``W_up`` and both biases at random too (tests).
        Other keywords: ``reduction_factor``, ``non_linearity``, ``scaling``, ``generator``.
        """
        self.sites.add(name, r, **kwargs)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter's slot from every site (other adapters are unchanged)."""
        self.sites.remove(name)

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """One adapter's weights: ``{"<module>.down" [r, H], ".down_bias" [r], ".up" [H, r], ".up_bias" [H]}``."""
        return self.sites.state_of(name)

    def load_adapter_state_dict(self, name: str, state: dict[str, Tensor]) -> None:
        """Copy :meth:`adapter_state_dict` output into an adapter of the same configuration (exact keys)."""
        self.sites.load_state(name, state)

    def adapter_index(self, adapter_names, rows: int, device=None) -> Optional[Tensor]:
        """The batch's slot index [rows] int32 (-1 = base model), or None when no row uses an adapter."""
        return self.sites.index(per_row(adapter_names, rows, self.sites.names), device)

    @contextlib.contextmanager
    def use(self, adapter_names, rows: int) -> Iterator[None]:
        """Route every call of the wrapped model inside the block (e.g. to call ``self.model`` directly)."""
        with self.routing.use(self.adapter_index(adapter_names, rows)):
            yield

    @staticmethod
    def _rows(args: tuple, kwargs: dict) -> int:
        for value in (*args, *(kwargs.get(k) for k in ("input_ids", "inputs_embeds", "pixel_values", "input_values"))):
            if isinstance(value, Tensor):
                return value.shape[0]
        raise ValueError("cannot tell the batch size: pass input_ids, inputs_embeds or pixel_values as a tensor")

    def forward(self, *args, adapter_names=None, **kwargs):
        with self.use(adapter_names, self._rows(args, kwargs)):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, *, adapter_names=None, **kwargs) -> Tensor:
        """``model.generate`` with one routing for the whole generation (no beam search: rows must keep their order)."""
        for key in ("num_beams", "num_return_sequences"):
            if int(kwargs.get(key) or 1) > 1:
                raise ValueError(f"{key} > 1 is not supported for per-row adapters")
        with self.use(adapter_names, input_ids.shape[0]):
            return self.model.generate(input_ids=input_ids, **kwargs)

    def remove(self) -> None:
        """Take every hook off and restore the base model's ``requires_grad`` flags (idempotent)."""
        self.sites.detach()
        for name, p in self.model.named_parameters():
            if name in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[name])

    def unwrap(self) -> nn.Module:
        self.remove()
        return self.model
