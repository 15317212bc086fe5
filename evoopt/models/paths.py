"""Data-flow-space merging (Akiba et al., "Evolutionary Optimization of Model Merging Recipes", 2024).

The weights stay as they are; a *path* decides which layers, of which models of a pool, a
token passes through, in which order, and a scale multiplies the hidden state entering each
layer (the paper's W[i, j] for the transition from layer i to layer j; on the first hop, the
embeddings entering the first layer). Embeddings, final norm and output head come from the
pool's first model, A.

:func:`path_model` builds such a model for Hugging Face decoders that keep their blocks in
``model.layers`` (Llama, Mistral, Qwen2, Gemma...) or ``transformer.h`` (GPT-2) without
copying a weight: it is a shallow copy of A whose layer list holds shallow copies of the
pool's layers. Each hop's attention
has its own ``layer_idx``, so a layer that appears several times on the path gets a key/value
cache slot per appearance; masks, rotary positions, batching and ``generate`` are the
model's own. :func:`decode_path` reads a path from the paper's search space: an indicator per
slot of the layout repeated r times, and a scaling matrix.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerPath:
    """The layers a token passes through: ``hops[t] = (model, layer)`` with ``scales[t]`` on the way in."""

    hops: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.hops:
            raise ValueError("hops: a path needs at least one layer")
        if len(self.scales) != len(self.hops):
            raise ValueError(f"scales: one per hop ({len(self.hops)}), got {len(self.scales)}")


class ScaledLayer(torch.nn.Module):
    """A decoder layer that first multiplies the hidden state entering it by ``scale``."""

    def __init__(self, layer: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(hidden_states * self.scale, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # the model may read its layers' attributes (attention_type...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


def decode_path(indicators: Sequence[float], scales: Sequence[Sequence[float]], layers: Sequence[int]) -> LayerPath:
    """The path that an indicator array and a scaling matrix describe (the paper's I and W).

    Args:
        indicators: one number per slot; T = M x r slots, where M = sum(layers) and the layout
            (all of model 0's layers, then model 1's, ...) is repeated r times. The layer in slot t
            is on the path when ``indicators[t] > 0``.
        scales: an (M + 1) x M matrix: ``scales[i][j]`` multiplies the hidden state that goes from
            layer i to layer j (global indices in the layout); row M is the embeddings, for the
            first hop. Only the transitions the path takes are read.
        layers: the number of layers of each model of the pool.
    """
    layout = [(m, layer) for m, count in enumerate(layers) for layer in range(count)]
    total = len(layout)
    if total == 0 or len(indicators) % total:
        raise ValueError(f"indicators: a multiple of M = {total} slots (the layout repeated r times), "
                         f"got {len(indicators)}")
    if len(scales) != total + 1 or any(len(row) != total for row in scales):
        raise ValueError(f"scales: an (M + 1) x M = {total + 1} x {total} matrix (row M: the embeddings)")
    chosen = [t % total for t, on in enumerate(indicators) if on > 0]
    if not chosen:
        raise ValueError("indicators: no slot is on the path (every value <= 0)")
    previous = [total, *chosen[:-1]]
    return LayerPath(tuple(layout[j] for j in chosen), tuple(float(scales[i][j]) for i, j in zip(previous, chosen)))


_STACKS = (("model", "layers"), ("transformer", "h"))  # Llama/Mistral/Qwen2/Gemma; GPT-2


def _stack(model: torch.nn.Module, label: str = "model") -> tuple[str, str]:
    """Where a decoder keeps its blocks: (inner module, list attribute)."""
    for inner, attribute in _STACKS:
        if isinstance(getattr(getattr(model, inner, None), attribute, None), torch.nn.ModuleList):
            return inner, attribute
    raise TypeError(f"{label}: {type(model).__name__} keeps no decoder blocks in model.layers or transformer.h; "
                    "data-flow merging supports Llama, Mistral, Qwen2, Gemma, GPT-2 and decoders built that way")


def decoder_layers(model: torch.nn.Module, label: str = "model") -> torch.nn.ModuleList:
    """The blocks of a decoder that keeps them in ``model.layers`` (or GPT-2's ``transformer.h``)."""
    inner, attribute = _stack(model, label)
    layers: torch.nn.ModuleList = getattr(getattr(model, inner), attribute)
    return layers


# a decoder layer's shapes and arithmetic, set by its model's config: pool models must agree on each
LAYER_SETTINGS = ("model_type", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "hidden_act", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rope_scaling",
                  "rope_parameters", "attention_bias", "mlp_bias", "scale_attn_by_inverse_layer_idx")


def _layer_setting(config: Any, key: str) -> Any:
    """A config's layer setting as the layers use it: ``head_dim`` unset (None) is hidden_size / heads."""
    value = getattr(config, key, None)
    if key == "head_dim" and value is None and getattr(config, "num_attention_heads", None):
        return config.hidden_size // config.num_attention_heads
    return value


def path_model(pool: Sequence[torch.nn.Module], path: LayerPath) -> Any:
    """A model of ``pool[0]``'s class running ``path``; it shares every weight with the pool.

    The pool's models are not changed. Their hidden sizes must agree; the result has
    ``config.num_hidden_layers == len(path.hops)``.
    """
    if not pool:
        raise ValueError("pool: give at least one model")
    first = pool[0]
    blocks = [decoder_layers(m, f"pool[{i}]") for i, m in enumerate(pool)]
    configs: list[Any] = [m.config for m in pool]
    sizes = {i: c.hidden_size for i, c in enumerate(configs)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pool: hidden sizes differ ({sizes}); a path can only join models of one width")
    for key in LAYER_SETTINGS:  # (the path model, and its export, are built from pool[0]'s config)
        if len({json.dumps(_layer_setting(c, key), sort_keys=True, default=str) for c in configs}) > 1:
            found = ", ".join(f"pool[{i}]: {_layer_setting(c, key)!r}" for i, c in enumerate(configs))
            raise ValueError(f"pool: the models' {key} differ ({found}); a path runs every layer with the first "
                             "model's settings: give models of one architecture")
    if getattr(first.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("pool: scale_attn_by_inverse_layer_idx is set (GPT-2): a layer's attention scale depends "
                         "on its index, which a path changes (and the exported model would rebuild)")
    for t, (m, layer) in enumerate(path.hops):
        if not 0 <= m < len(pool):
            raise ValueError(f"hops[{t}]: model {m} is not in the pool (0..{len(pool) - 1})")
        if not 0 <= layer < len(blocks[m]):
            raise ValueError(f"hops[{t}]: model {m} has layers 0..{len(blocks[m]) - 1}, not {layer}")
    config: Any = copy.deepcopy(first.config)
    config.num_hidden_layers = len(path.hops)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [configs[m].layer_types[layer] for m, layer in path.hops]
    hops = []
    for t, ((m, layer), scale) in enumerate(zip(path.hops, path.scales)):
        block = _shallow(blocks[m][layer])
        for name in ("self_attn", "attn"):
            attention = getattr(block, name, None)
            if attention is not None and hasattr(attention, "layer_idx"):
                attention = _shallow(attention)
                attention.layer_idx = t  # its own key/value cache slot
                setattr(block, name, attention)
        hops.append(ScaledLayer(block, scale))
    where, attribute = _stack(first)
    inner = _shallow(getattr(first, where))
    inner.config = config
    setattr(inner, attribute, torch.nn.ModuleList(hops))
    model = _shallow(first)
    model.config = config
    setattr(model, where, inner)
    return model


def _shallow(module: torch.nn.Module) -> Any:
    """A new module object over the same parameters and submodules (their containers copied, hooks not)."""
    clone = copy.copy(module)
    for key, value in list(vars(clone).items()):
        if key in ("_modules", "_parameters", "_buffers"):
            setattr(clone, key, OrderedDict(value))
        elif "hook" in key and isinstance(value, dict):
            setattr(clone, key, OrderedDict())
    return clone


def path_parameters(pool: Sequence[torch.nn.Module], path: LayerPath) -> int:
    """Parameters of the path's model as exported: A's embeddings, norm and head, and a copy of each hop's layer."""
    blocks = [decoder_layers(m, f"pool[{i}]") for i, m in enumerate(pool)]
    inside = {id(p) for layers in blocks for layer in layers for p in layer.parameters()}
    outside = sum(p.numel() for p in pool[0].parameters() if id(p) not in inside)  # (tied weights once)
    return outside + sum(p.numel() for m, layer in path.hops for p in blocks[m][layer].parameters())


MODELING_FILE = "modeling_evoopt_dfs.py"
_MODELING = '''"""A data-flow-space model written by evoopt: {model_class} layers on a path, each entered scaled.

The checkpoint stores the path's layers in path order (a layer the path takes twice is stored
twice); ``config.dfs_scales[t]`` multiplies the hidden state entering layer t, and
``config.dfs_path`` says which model of ``config.dfs_pool`` and which of its layers each one
is. Load with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

config.json keeps the source's model_type, so that the tokenizer (and AutoConfig) load without
remote code and without a prompt; its MLP width is stored in ``dfs_guard`` and written as 0, so
that the plain class, loaded without remote code, refuses the checkpoint (size mismatch) instead
of running the path without its scales. This config class puts the width back.
"""

from transformers import {config_class}, {model_class}


class EvooptDfsConfig({config_class}):
    def __init__(self, **kwargs):
        kwargs.update(kwargs.pop("dfs_guard", None) or {{}})
        super().__init__(**kwargs)


class EvooptDfsForCausalLM({model_class}):
    config_class = EvooptDfsConfig

    def __init__(self, config):
        super().__init__(config)
        blocks = self.model.layers if hasattr(self, "model") else self.transformer.h
        for layer, scale in zip(blocks, config.dfs_scales):
            if scale != 1.0:
                layer.register_forward_pre_hook(_Scale(scale), with_kwargs=True)


class _Scale:
    """Multiplies the hidden state entering a layer (passed by position or by name)."""

    def __init__(self, scale):
        self.scale = float(scale)

    def __call__(self, module, args, kwargs):
        if args:
            return (args[0] * self.scale, *args[1:]), kwargs
        return args, {{**kwargs, "hidden_states": kwargs["hidden_states"] * self.scale}}
'''
# the config key of the MLP width, by family: written as 0 so that only the remote-code class can load the folder
_MLP_WIDTH = ("intermediate_size", "n_inner")


def export_path(pool: Sequence[torch.nn.Module], path: LayerPath, out: Any, *, tokenizer_from: Any,
                card: str, info: dict[str, Any], overwrite: bool = False) -> Any:
    """Save the path's model as a Hugging Face folder that reloads with ``trust_remote_code=True``.

    The layers are materialised in path order (an ordinary checkpoint of ``pool[0]``'s class with
    ``len(path.hops)`` layers); the scales, the path and ``info`` (the pool, where it came from) go
    into config.json, and a small modeling file applies the scales. Written atomically.
    """
    import json
    import shutil
    from pathlib import Path

    from evoopt.models.io import TOKENIZER_FILES, atomic_folder

    model = path_model(pool, path)
    cls = type(pool[0])
    prefix = ".".join(_stack(pool[0])) + "."
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):  # <prefix><t>.layer.<rest>: ScaledLayer's wrapping
            t, _, rest = name.removeprefix(prefix).split(".", 2)
            name = f"{prefix}{t}.{rest}"
        state[name] = tensor
    config = copy.deepcopy(model.config)
    config.architectures = ["EvooptDfsForCausalLM"]
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.EvooptDfsConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.EvooptDfsForCausalLM"}
    config.dfs_path = [list(hop) for hop in path.hops]
    config.dfs_scales = list(path.scales)
    config.dfs_pool = info
    materialised: Any = cls(config)
    materialised.load_state_dict(state, strict=True)  # copies: a layer on the path twice is stored twice
    materialised.to(next(pool[0].parameters()).dtype).eval()
    if getattr(pool[0], "generation_config", None) is not None:  # (its end tokens: what a generative task stops on)
        materialised.generation_config = copy.deepcopy(pool[0].generation_config)
    with atomic_folder(Path(out), overwrite=overwrite) as tmp:
        materialised.save_pretrained(tmp, max_shard_size="2GB")
        saved = json.loads((tmp / "config.json").read_text())
        # The source's model_type: AutoTokenizer reads config.json first, and a model_type transformers does not
        # know makes it ask whether to run the custom code (a prompt that hangs a batch job). Without
        # trust_remote_code the plain class then refuses the checkpoint: its MLP width reads 0 (the guard).
        width = next(key for key in _MLP_WIDTH if key in saved)
        saved["dfs_guard"] = {width: saved[width]}
        saved[width] = 0
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        (tmp / MODELING_FILE).write_text(_MODELING.format(config_class=type(pool[0].config).__name__,
                                                          model_class=cls.__name__))
        if tokenizer_from is not None:
            for file in TOKENIZER_FILES:
                if (Path(tokenizer_from) / file).exists():
                    shutil.copy2(Path(tokenizer_from) / file, tmp / file)
        (tmp / "README.md").write_text(card)
    return out
