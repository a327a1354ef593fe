"""``lightfed generate``: complete (or chat with) a prompt using a trained :class:`~lightfed.models.causal_lm.CausalLM`.

    lightfed generate --ckpt_path runs/shakespeare_causal_lora/version_0/checkpoints/last.ckpt \\
        --prompt "To be, or not to be" --max_new_tokens 40

The model is rebuilt from the config stored in the checkpoint (its ``model`` section) and given the
checkpoint's global payload; decoding is greedy. ``--chat`` wraps the prompt as a user turn with the
tokenizer's chat template (SmolLM2-Instruct is a chat model).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import yaml

__all__ = ["load_causal_lm", "main"]


def load_causal_lm(ckpt_path: str) -> Any:
    """The :class:`~lightfed.models.causal_lm.CausalLM` of a lightfed checkpoint, holding its global model.

    Raises:
        FileNotFoundError, ValueError: the file is not a lightfed checkpoint, holds no config, or its model is
            not a CausalLM.
    """
    from lightfed import resume
    from lightfed.models.causal_lm import CausalLM
    from lightfed.params import ParamSpec

    state = resume.read(ckpt_path)
    config = yaml.safe_load(state["progress"].get("config") or "") or {}
    section = config.get("model") or {}
    class_path = section.get("class_path", "") if isinstance(section, dict) else ""
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None) if module_name else None
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise ValueError(
            f"--ckpt_path {ckpt_path!r}: its model is {class_path or 'not recorded (a run of the Python API)'}; "
            f"lightfed generate needs a run of lightfed.models.CausalLM from a config."
        )
    model = cls(**(section.get("init_args") or {}))
    names = list(state["model"]["payload_names"])
    spec = ParamSpec.from_module(model, [n.replace("[", "[[]") for n in names])
    if list(spec.names) != names:
        raise ValueError(f"--ckpt_path {ckpt_path!r}: the payload does not match the model the config builds.")
    spec.assign(spec.tensors(model), state["model"]["global_params"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """Parse ``lightfed generate`` arguments and print the completion of each prompt."""
    p = argparse.ArgumentParser(prog="lightfed generate", description="Greedy completion with a trained CausalLM.")
    p.add_argument("--ckpt_path", required=True, help="a lightfed checkpoint of a CausalLM run (…/checkpoints/last.ckpt)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    model = load_causal_lm(args.ckpt_path)
    for prompt, text in zip(args.prompt, model.generate(args.prompt, args.max_new_tokens, args.chat)):
        print(f"{prompt}{text}")
