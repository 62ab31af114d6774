"""Hugging Face checkpoints <-> attnkit models: reading a local directory (config.json +
model.safetensors / pytorch_model.bin, sharded or not), the explicit name mapping each
model declares, and writing a directory transformers loads back. Never touches the network
and never imports transformers."""
from __future__ import annotations

import contextvars
import dataclasses
import json
import os
import re
from typing import Dict, Iterable, List, Tuple

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: wrong architecture, missing or unexpected weights."""


def read_checkpoint(path: str) -> Tuple[dict, Dict[str, Tensor]]:
    """(config dict, state dict with Hugging Face names) from a local directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory (from_pretrained reads a local checkpoint directory; "
                                f"it never downloads)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(config_file) as f:
        config = json.load(f)
    return config, _read_weights(path)


def _read_weights(path: str) -> Dict[str, Tensor]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(path, single)):
            return _load_file(os.path.join(path, single))
        if os.path.isfile(os.path.join(path, index_name)):  # sharded: weight_map names the shard of each tensor
            with open(os.path.join(path, index_name)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_file(os.path.join(path, shard)))
            return state
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or a sharded index) in {path!r}")


def _load_file(file: str) -> Dict[str, Tensor]:
    if file.endswith(".safetensors"):
        load_file = _safetensors().load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def check_model_type(config: dict, expected: str, cls_name: str, where: str) -> None:
    found = config.get("model_type")
    if found != expected:
        raise CheckpointError(f"{where} holds a {found!r} checkpoint (config.json model_type), but {cls_name} loads "
                              f"{expected!r} checkpoints")


def config_from_dict(config_cls, config: dict):
    """The dataclass fields present in a Hugging Face config dict (whose names they share)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in config.items() if k in names})


def convert(hf_state: Dict[str, Tensor], mapping: Dict[str, List[str]], transposed: Iterable[str],
            ignored: Iterable[str], where: str) -> Dict[str, Tensor]:
    """Our state dict from Hugging Face tensors. mapping: our name -> the HF names whose tensors
    (transposed for the names in `transposed`, GPT-2's Conv1D) are concatenated along dim 0
    (fused q/k/v). Keys matching an `ignored` regex (buffers, tied copies, unused heads) are
    dropped; any other leftover or absent key is an error."""
    transposed, used, ours, missing = set(transposed), set(), {}, []
    for name, sources in mapping.items():
        used.update(sources)  # claimed even when a sibling is missing: reported once, as missing
        if any(s not in hf_state for s in sources):
            missing += [s for s in sources if s not in hf_state]
            continue
        parts = [hf_state[s].t() if name in transposed else hf_state[s] for s in sources]
        ours[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    unexpected = [k for k in hf_state if k not in used and not any(re.fullmatch(p, k) for p in ignored)]
    if missing or unexpected:
        raise CheckpointError(f"{where}: the checkpoint does not match the model: missing keys {sorted(missing)}, "
                              f"unexpected keys {sorted(unexpected)}")
    return ours


def unconvert(state: Dict[str, Tensor], mapping: Dict[str, List[str]], transposed: Iterable[str]) -> Dict[str, Tensor]:
    """The inverse of `convert`: Hugging Face names, fused tensors split back, contiguous copies."""
    transposed, hf = set(transposed), {}
    for name, sources in mapping.items():
        parts = state[name].detach().chunk(len(sources), dim=0)
        for source, part in zip(sources, parts):
            hf[source] = (part.t() if name in transposed else part).contiguous().clone()
    return hf


def write_checkpoint(path: str, config: dict, hf_state: Dict[str, Tensor]) -> None:
    save_file = _safetensors().save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(hf_state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# Set while _from_state builds a model whose weights all come from a checkpoint.
_loading: contextvars.ContextVar = contextvars.ContextVar("attnkit_models_loading", default=False)


class PretrainedMixin:
    """from_pretrained / from_hf / save_pretrained for a model class that defines
    config_class, model_type, hf_mapping() -> (mapping, transposed, ignored) and hf_config();
    and transformers' initialization of a model built from a config (init_weights)."""

    def init_weights(self) -> None:
        """(Re)initializes every weight as transformers does for this architecture: Linear and
        Embedding weights N(0, config.initializer_range) (an Embedding's padding row 0), biases 0,
        LayerNorm weights 1; then the model's own rules (GPT-2's scaled residual projections).
        Constructors call it: torch's default init (N(0, 1) embeddings) gave a freshly built
        GPT-2 a loss of ~174 on random tokens, against ln(vocab) ~ 9 with transformers' init."""
        for model in self.modules():  # a head's nested model too (BertForMaskedLM.bert)
            if isinstance(model, PretrainedMixin):
                model._init_own_weights()

    def _init_own_weights(self) -> None:
        """The modules of this model but not of a nested model, which its own constructor initialized."""
        if _loading.get():
            return
        std = self.config.initializer_range
        # A head tied to the embeddings is initialized as the embedding (padding row 0 included).
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        with torch.no_grad():
            for module in _own_modules(self):
                if isinstance(module, torch.nn.Linear):
                    if id(module.weight) not in embedding_weights:
                        module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, torch.nn.Embedding):
                    module.weight.normal_(0.0, std)
                    if module.padding_idx is not None:
                        module.weight[module.padding_idx].zero_()
                elif isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
                    module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()
            self._init_extra(std)

    def _init_extra(self, std: float) -> None:
        """Initialization rules beyond the common ones; none by default."""

    @classmethod
    def from_pretrained(cls, path: str, **kwargs):
        """The model saved in a local directory; kwargs go to the constructor (BertModel: add_pooling_layer)."""
        config, state = read_checkpoint(path)
        return cls._from_state(config, state, f"{cls.__name__}.from_pretrained({path!r})", kwargs)

    @classmethod
    def from_hf(cls, hf_model, **kwargs):
        """Converts a loaded transformers model (its weights are copied)."""
        if not callable(getattr(getattr(hf_model, "config", None), "to_dict", None)) or \
                not callable(getattr(hf_model, "state_dict", None)):
            raise TypeError(f"{cls.__name__}.from_hf: expected a loaded transformers model (with .config and "
                            f".state_dict()), got {type(hf_model).__name__}")
        config = hf_model.config.to_dict()
        return cls._from_state(config, hf_model.state_dict(), f"{cls.__name__}.from_hf({type(hf_model).__name__})",
                               kwargs)

    @classmethod
    def _from_state(cls, config: dict, state: Dict[str, Tensor], where: str, kwargs: dict):
        check_model_type(config, cls.model_type, cls.__name__, where)
        token = _loading.set(True)  # every weight comes from the checkpoint: no init pass (0.5 s for BERT-base)
        try:
            model = cls(config_from_dict(cls.config_class, cls.config_class.normalize(config)), **kwargs)
        finally:
            _loading.reset(token)
        # Fields our config does not use (label names, problem_type, ...) go back out on save.
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        model._hf_config_extra = {k: v for k, v in config.items() if k not in fields and k not in _DERIVED_FIELDS}
        mapping, transposed, ignored = model.hf_mapping()
        state = _adjust_prefix(_legacy_names(state), mapping, model.base_prefix)
        ours = convert(state, mapping, transposed, ignored, where)
        dtype = next(iter(ours.values())).dtype if ours else torch.float32
        model.to(dtype)
        result = model.load_state_dict(ours, strict=False)
        # Keys our mapping leaves out are tied weights (lm head = embeddings) or non-persistent buffers.
        assert not result.unexpected_keys, result.unexpected_keys
        return model.eval()

    def save_pretrained(self, path: str) -> None:
        mapping, transposed, _ = self.hf_mapping()
        config = {**self.hf_config(), **getattr(self, "_hf_config_extra", {})}
        write_checkpoint(path, config, self.hf_extra_tensors(unconvert(self.state_dict(), mapping, transposed)))

    def hf_extra_tensors(self, hf_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Copies transformers expects under a second name; none by default."""
        return hf_state


def _own_modules(model: torch.nn.Module) -> Iterable[torch.nn.Module]:
    """model's modules, not descending into nested PretrainedMixin models."""
    for child in model.children():
        if not isinstance(child, PretrainedMixin):
            yield child
            yield from _own_modules(child)


# Written from the model on save: its class and dtype may differ from the checkpoint's.
_DERIVED_FIELDS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}


def _legacy_names(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """LayerNorm.gamma / .beta (the first BERT conversions) as .weight / .bias, as transformers reads them."""
    rename = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
    return {next((k[: -len(old)] + new for old, new in rename.items() if k.endswith(old)), k): v
            for k, v in state.items()}


def _adjust_prefix(state: Dict[str, Tensor], mapping: Dict[str, List[str]], prefix: str) -> Dict[str, Tensor]:
    """Base models load the body of a task checkpoint ("bert.", "transformer." prefix, head
    dropped) and task models load a bare base checkpoint (prefix added; the head is then missing)."""
    wants_prefix = any(s.startswith(prefix) for sources in mapping.values() for s in sources)
    has_prefix = any(k.startswith(prefix) for k in state)
    if wants_prefix and not has_prefix:
        return {prefix + k: v for k, v in state.items()}
    if not wants_prefix and has_prefix:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _safetensors():
    """safetensors.torch, or an error saying which install brings it (the [hf] extra)."""
    try:
        import safetensors.torch
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("attnkit.models: .safetensors checkpoints need the safetensors package: "
                                  "pip install 'attnkit[hf]' (or pip install safetensors)") from error
    return safetensors.torch
