"""Hugging Face model cards (`README.md`) for the models a run exports.

    write_model_card("RUN/ppo/model", "ppo", config, metrics, eval=None)

`config` is the run's resolved config as a plain dict (what `config.yaml` holds), `metrics` the
stage's result (`summary.json["stages"][stage]`), `eval` what `python -m rlhf.evaluation` measured.
The card is a `huggingface_hub.ModelCard`: its metadata (`ModelCardData`: library_name, tags,
pipeline_tag, base_model, datasets, language, license when the config names one) is the YAML front
matter the Hub reads; its Markdown body says how the model was made (stage, base model, data, the
stage's hyperparameters, seed), the run's final metrics, the evaluation (when given) and how to load it
with plain `transformers`. Any key may be missing from any argument: the card then says less, never fails.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData


def _stage(name: str):
    """The stage's class from the registry (its title, description, what it produces), or None."""
    from rlhf.stages import stages

    return stages().get(name)


# Stage settings that are bookkeeping, not hyperparameters (paths are listed under "initialised from").
NOT_HYPERPARAMETERS = {"_target_", "val_every", "val_batches", "sample_every", "eval_prompts", "policy_path"}
# Result keys that are not metrics.
NOT_METRICS = {"model_dir", "metrics_csv", "samples", "run_dir"}

# Human names of the metrics `rlhf.evaluation` and the stages report (unknown keys show as themselves).
METRIC_LABELS = {
    "reward": "reward-model score (mean)",
    "gold": "gold score (mean)",
    "length": "response length (tokens, mean)",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "rm_win_rate": "win rate vs SFT (reward model)",
    "gold_win_rate": "win rate vs SFT (gold)",
    "kl_to_sft": "KL to SFT (k1, nats per sequence)",
}
# Evaluation keys that describe the setup rather than measure anything.
EVAL_SETTINGS = ("prompts", "max_new_tokens", "temperature", "seed")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def write_model_card(model_dir: str | Path, stage: str, config: Mapping | None, metrics: Mapping | None,
                     eval: Mapping | None = None) -> Path:
    """Write `model_dir/README.md` (atomically) and return its path."""
    out = Path(model_dir) / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("README.md.tmp")
    tmp.write_text(model_card(stage, config, metrics, eval), encoding="utf-8")
    os.replace(tmp, out)
    return out


def model_card(stage: str, config: Mapping | None, metrics: Mapping | None, eval: Mapping | None = None) -> str:
    """The card's text: the metadata as YAML front matter, then Markdown."""
    config = _plain(config)
    metrics = _plain(metrics)
    model = _get(config, "model")
    data = _get(config, "data")
    stage_cfg = _get(config, stage)
    cls = _stage(stage)
    plan = metrics.get("plan") or config.get("plan")
    how = f" ({' -> '.join(plan)})" if plan else ""

    body = "\n".join([
        f"# {cls.title if cls else stage} ({model.get('name') or 'model'}, {_data_name(data)})", "",
        f"Trained with rlhf-lightning{how} on PyTorch Lightning and Hydra; "
        f"this is the output of the `{stage}` stage.", "",
        "## How it was made", "",
        *_made(stage, config, model, data, stage_cfg), "",
        "### Hyperparameters", "",
        *_table(("setting", "value"), _hyperparameters(stage_cfg, _get(config, "trainer"), config.get("seed"))), "",
        "## Metrics (from the run)", "",
        *(_table(("metric", "value"), [(k, _fmt(v)) for k, v in _scalars(metrics)])
          or ["No metrics were recorded for this stage."]), "",
        *(_eval_section(_plain(eval)) if eval else []),
        "## How to load it", "",
        *_how_to_load(stage, stage_cfg), "",
    ])
    return str(ModelCard(f"---\n{card_data(stage, config).to_yaml()}\n---\n\n{body}"))


def card_data(stage: str, config: Mapping | None) -> ModelCardData:
    """The metadata the Hub reads. Metrics stay in the body: they compare this model with the run's own SFT
    policy under the run's own reward model, not a shared benchmark that `model-index` could name."""
    config = _plain(config)
    cls = _stage(stage)
    base = _get(config, "model").get("name_or_path")
    data = _get(config, "data")
    hh = _task(data) == "HHRLHF"
    return ModelCardData(
        library_name="transformers", tags=["rlhf", stage],
        pipeline_tag="text-classification" if cls is not None and cls.produces == "reward" else "text-generation",
        base_model=base if isinstance(base, str) and _HUB_ID.match(base) else None,  # a local path: in the body
        datasets=[data.get("path") or "Anthropic/hh-rlhf"] if hh else None,
        language="en" if hh else None,  # the synthetic tasks are no natural language's text
        license=config["license"] if isinstance(config.get("license"), str) else None,
    )


def front_matter(stage: str, config: Mapping | None) -> dict:
    """`card_data` as the front matter's dict (unset keys left out)."""
    return card_data(stage, config).to_dict()


# ----- sections -----

def _made(stage: str, config: dict, model: dict, data: dict, stage_cfg: dict) -> list[str]:
    cls = _stage(stage)
    what = cls.description if cls else ""
    if cls and cls.paper:
        what += f" Follows {cls.paper}."
    lines = [f"- **Stage:** `{stage}`. {what}".rstrip(),
             f"- **Base model:** {_base_model(model)}",
             f"- **Data:** {_data_description(data)}"]
    init = _initialised_from(stage, stage_cfg, _get(config, "reward"))
    if init:
        lines.append(f"- **Initialised from:** {init}")
    if config.get("seed") is not None:
        lines.append(f"- **Seed:** {config['seed']}")
    return lines


def _base_model(model: dict) -> str:
    path, name = model.get("name_or_path"), model.get("name")
    if path:
        return f"`{path}`" + (f" (model config `{name}`)" if name and name != path else "")
    arch = model.get("arch") or {}
    shape = ", ".join(f"{k}={v}" for k, v in arch.items()) if isinstance(arch, Mapping) else ""
    return (f"`{name or 'unknown'}`, a GPT-2 initialised from scratch" + (f" ({shape})" if shape else "")
            + (f", tokenizer `{model['tokenizer']}`" if model.get("tokenizer") else ""))


def _data_name(data: dict) -> str:
    task = _task(data)
    return {"HHRLHF": "HH-RLHF", "SyntheticPreferences": "synthetic preferences"}.get(task, task or "unknown data")


def _data_description(data: dict) -> str:
    if _task(data) == "HHRLHF":
        files = data.get("data_files")
        if files:
            files = ", ".join(f"`{f}`" for f in (files if isinstance(files, list) else [files]))
            src = f"local HH-format files {files}"
        else:
            src = f"`{data.get('path') or 'Anthropic/hh-rlhf'}` (train split `{data.get('split', 'train')}`)"
        extra = ", ".join(f"{k}={data[k]}" for k in ("max_pairs", "val_fraction") if data.get(k) is not None)
        return f"Anthropic HH-RLHF preference pairs: {src}" + (f" ({extra})" if extra else "")
    if _task(data) == "SyntheticPreferences":
        extra = ", ".join(f"{k}={data[k]}" for k in ("n_pairs", "val_fraction", "seed") if data.get(k) is not None)
        return ("synthetic HH-format dialogues whose preferences come from a known gold function "
                f"(`rlhf.data.SyntheticPreferences`{': ' + extra if extra else ''})")
    target = data.get("_target_")
    if not target:
        return "not recorded"
    try:  # any other task describes itself: its class's first docstring line and its settings
        from rlhf.data.pairs import task_class

        doc = (task_class(target).__doc__ or "").strip().splitlines()[0].rstrip(".")
    except Exception:
        doc = ""
    extra = ", ".join(f"{k}={v}" for k, v in data.items() if k != "_target_" and isinstance(v, (int, float, str)))
    return f"{doc + ' ' if doc else ''}(`{target}`{': ' + extra if extra else ''})"


def _initialised_from(stage: str, stage_cfg: dict, reward: dict) -> str:
    cls = _stage(stage)
    if cls is None:
        return ""
    parts = []
    if "policy" in cls.uses and cls.produces == "reward":
        parts.append("the SFT policy's export (`sft/model`) when the run trained one, with a new scalar head")
    elif "policy" in cls.uses:  # a policy trained from the base model (ORPO), judged against the SFT policy
        init = stage_cfg.get("init_path")
        parts.append(f"trained from {f'`{init}`' if init else 'the base model (the model config)'}; "
                     "evaluation baseline: the SFT export (`sft/model`) when the run trained one")
    if "policy" in cls.needs:
        policy = stage_cfg.get("policy_path")
        parts.append(f"policy and KL reference: {f'`{policy}`' if policy else 'the SFT export (`sft/model`)'}")
    if "reward" in cls.needs:
        fns, path = reward.get("fn"), reward.get("model_path")
        if fns:
            names = fns if isinstance(fns, list) else [fns]
            parts.append("reward functions: " + ", ".join(f"`{f}`" for f in names)
                         + (f", with the reward model `{path}`" if path else ""))
        else:
            parts.append(f"reward model: {f'`{path}`' if path else 'the run’s `rm/model`'}")
    return "; ".join(parts)


def _hyperparameters(stage_cfg: dict, trainer: dict, seed) -> list[tuple[str, str]]:
    rows = [(k, _fmt(v)) for k, v in stage_cfg.items()
            if k not in NOT_HYPERPARAMETERS and (v is None or isinstance(v, (str, int, float, bool)))]
    steps = trainer.get("max_steps")
    if steps is not None:  # trainer.max_steps overrides every stage's max_steps
        rows = [r for r in rows if r[0] != "max_steps"] + [("max_steps (trainer.max_steps)", _fmt(steps))]
    if trainer.get("precision") is not None:
        rows.append(("precision", _fmt(trainer["precision"])))
    if seed is not None:
        rows.append(("seed", _fmt(seed)))
    return rows


def _eval_section(ev: dict) -> list[str]:
    """Paired `<metric>_policy` / `<metric>_sft` keys side by side, then the single numbers."""
    paired = [k[: -len("_policy")] for k, v in ev.items() if k.endswith("_policy") and _is_number(v)]
    rows = [(METRIC_LABELS.get(m, m), _fmt(ev[f"{m}_policy"]), _fmt(ev.get(f"{m}_sft"))) for m in paired]
    used = {f"{m}_policy" for m in paired} | {f"{m}_sft" for m in paired} | set(EVAL_SETTINGS)
    singles = [(k, v) for k, v in _scalars(ev) if k not in used]
    singles.sort(key=lambda kv: (list(METRIC_LABELS).index(kv[0]) if kv[0] in METRIC_LABELS else len(METRIC_LABELS)))
    rows += [(METRIC_LABELS.get(k, k), _fmt(v), "") for k, v in singles]
    setup = ", ".join(f"{k.replace('_', ' ')} {_fmt(ev[k])}" for k in EVAL_SETTINGS if ev.get(k) is not None)
    intro = ("`python -m rlhf.evaluation`: one sampled response per held-out prompt from this model and from the "
             "SFT (reference) policy, scored by the run's reward model"
             + (" and by the data's gold function" if any(k.startswith("gold") for k in ev) else "")
             + ". Win rates count ties as half." + (f" Setup: {setup}." if setup else ""))
    return ["## Evaluation", "", intro, "", *_table(("metric", "this model", "SFT reference"), rows), ""]


def _how_to_load(stage: str, stage_cfg: dict) -> list[str]:
    path = f"{stage}/model"
    cls = _stage(stage)
    if cls is not None and cls.produces == "reward":
        code = [
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'path = "{path}"  # this directory (inside the run directory), or its Hub repo id once uploaded',
            "tok = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForSequenceClassification.from_pretrained(path).eval()",
            'text = "\\n\\nHuman: Any tips on cooking?\\n\\nAssistant: Sure, salt the pan."',
            "with torch.no_grad():",
            "    raw = model(**tok(text, return_tensors=\"pt\")).logits[0, 0].item()",
            "# the score RL stages used: normalised with the statistics stored in config.json",
            'score = (raw - getattr(model.config, "reward_mean", 0.0)) / getattr(model.config, "reward_std", 1.0)',
        ]
        note = ("Score one unpadded sequence at a time as above (or pad on the right): the score is read at the "
                "last token.")
    else:
        n = stage_cfg.get("response_length") if isinstance(stage_cfg.get("response_length"), int) else 64
        t = stage_cfg.get("temperature") if _is_number(stage_cfg.get("temperature")) else 1.0
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'path = "{path}"  # this directory (inside the run directory), or its Hub repo id once uploaded',
            "tok = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForCausalLM.from_pretrained(path)",
            'prompt = "\\n\\nHuman: Any tips on cooking?\\n\\nAssistant:"',
            'inputs = tok(prompt, return_tensors="pt")',
            f"out = model.generate(**inputs, max_new_tokens={n}, do_sample=True, temperature={t}, top_k=0,",
            "                     pad_token_id=tok.eos_token_id)",
            "print(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))",
        ]
        note = "Prompts use the HH-RLHF format: `\\n\\nHuman: ...\\n\\nAssistant:`; the response follows."
    return ["```python", *code, "```", "", note]


# ----- helpers -----

def _plain(x) -> dict:
    """A plain dict from a dict or an OmegaConf DictConfig (a Mapping too); {} from anything else."""
    return dict(x) if isinstance(x, Mapping) else {}


def _get(d: dict, key: str) -> dict:
    return _plain(d.get(key))


def _task(data: dict) -> str:
    """The data's class name (`HHRLHF`, `SyntheticPreferences`, ...), or ""."""
    return str(data.get("_target_") or "").rsplit(".", 1)[-1]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalars(d: dict) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in d.items() if k not in NOT_METRICS and (_is_number(v) or isinstance(v, bool))]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    return str(v).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    if not rows:
        return []
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]
