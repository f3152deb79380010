"""LoRA adapters on the MoT decoder through peft, with presets per expert.

Presets choose *which expert's* projections get adapters: ``und`` (understanding: text, ViT
and image markers), ``gen`` (generation: VAE latent tokens) or ``both``. A plain list of names
like ``["q_proj", "v_proj"]`` would match both experts' copies (or, written BAGEL-style, silently
miss the generation expert's attention), so the presets build explicit regular expressions.

    python -c "from unibrain_hf.train.lora import lora_target_regex; print(lora_target_regex('gen'))"
"""

from __future__ import annotations

from pathlib import Path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_target_regex(preset: str, projections=ATTENTION + MLP) -> str:
    """A peft ``target_modules`` full-match regex for the chosen experts and projections."""
    experts = {"und": "und", "gen": "gen", "both": "(?:und|gen)"}
    if preset not in experts:
        raise ValueError(f"LoRA preset must be one of {sorted(experts)}, got {preset!r}")
    unknown = sorted(set(projections) - set(ATTENTION + MLP))
    if unknown:
        raise ValueError(f"unknown LoRA projection(s) {unknown}; choose from {ATTENTION + MLP}")
    attention = [p for p in projections if p in ATTENTION]
    mlp = [p for p in projections if p in MLP]
    alternatives = []
    if attention:
        alternatives.append("(?:" + "|".join(attention) + ")")
    if mlp:
        alternatives.append(r"mlp\.(?:" + "|".join(mlp) + ")")
    if not alternatives:
        raise ValueError("no LoRA projections selected")
    return rf".*language_model\.layers\.\d+\.{experts[preset]}\.(?:{'|'.join(alternatives)})"


def apply_lora(model, preset: str = "both", rank: int = 8, alpha: int = 32, dropout: float = 0.1,
               projections=ATTENTION + MLP, target_modules=None):
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights remain trainable.

    ``target_modules`` (a peft regex or list of names) replaces the preset's regex. A target that
    matches no module of ``model`` is a :class:`~unibrain_hf.errors.ConfigError`, raised before
    anything is trained.
    """
    from peft import LoraConfig, get_peft_model

    from ..errors import ConfigError

    targets = target_modules if target_modules is not None else lora_target_regex(preset, tuple(projections))
    where = "lora.target_modules" if target_modules is not None else f"lora.preset={preset!r} / lora.projections"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"{where} matches no module of the model ({targets!r}): {exc}") from None
    if not any("lora_" in name for name, _ in wrapped.named_parameters()):
        raise ConfigError(f"{where} matches no module of the model ({targets!r})")
    return wrapped


def resolve_lora(model, section):
    """The model to train for a config's ``lora:`` section: peft-wrapped when enabled, else unchanged.

    The one place LoRA is decided; everything downstream (stage predicate, checkpoint, export)
    works on whatever this returns.
    """
    if not section.enabled:
        return model
    model.requires_grad_(False)
    return apply_lora(model, section.preset, section.rank, section.alpha, section.dropout, section.projections,
                      section.target_modules)


def load_lora(model, adapter_dir: str | Path, merge: bool = False, adapter_name: str = "default"):
    """Attach a saved adapter to ``model`` (a ``UniBrainForConditionalGeneration``); optionally merge it."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a peft adapter directory (no adapter_config.json)")
    wrapped = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
    return wrapped.merge_and_unload() if merge else wrapped
