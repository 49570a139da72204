"""Check a loaded config without calling a model, listing every problem with its key path."""

from __future__ import annotations

from pathlib import Path

from modelyard.config import LoadedConfig, stage_prompt
from modelyard.errors import ConfigError, UserError
from modelyard.stages import Stage
from modelyard.templates import variables_of

BUILTINS = {"builtin:tiny-llama", "builtin:small-llama", "builtin:minilm"}


def check(loaded: LoadedConfig, *, raise_on_error: bool = False, input_columns: list[str] | None = None) -> list[str]:
    """Every problem of the config: templates, expressions, schemas, references, input columns."""
    from modelyard.plan import input_columns as read_columns

    cfg, path = loaded.config, loaded.path
    problems: list[str] = []
    for name, m in cfg.models.items():
        if m.model.startswith("builtin:") and m.model not in BUILTINS:
            problems.append(f"{path}: models.{name}.model: unknown builtin {m.model!r} (have: {', '.join(sorted(BUILTINS))})")
        if m.model == "builtin:minilm" and m.task != "embed":
            problems.append(f"{path}: models.{name}: builtin:minilm is an embedding model; set task: embed")
    if input_columns is None:
        try:
            input_columns = read_columns(cfg.input).names
        except UserError as e:
            problems.append(f"{path}: input: {e}")
    if input_columns is not None and cfg.input.key and cfg.input.key not in input_columns:
        problems.append(f"{path}: input.key: column {cfg.input.key!r} is not in the input "
                        f"(columns: {', '.join(input_columns)})")
    available = set(input_columns or [])
    for i, sc in enumerate(cfg.stages):
        where = f"{path}: stages[{i}] ({sc.name})"
        try:
            Stage(sc, cfg.models[sc.model], cfg.models[sc.model].model, Path(loaded.base_dir))
        except ConfigError as e:
            problems.append(f"{where}: {e}")
        if input_columns is not None:
            for key, source, expression in (("prompt" if sc.input is None else "input", None, False),
                                            ("system", sc.system, False), ("when", sc.when, True)):
                try:
                    if source is None and key != "prompt" and key != "input":
                        continue
                    text = stage_prompt(sc, loaded.base_dir) if source is None else source
                    variables = variables_of(text, expression=expression)
                except ConfigError as e:
                    problems.append(f"{where}.{key}: {e}")
                    continue
                missing = sorted(variables - available)
                if missing:
                    later = {s.output for s in cfg.stages[i:]}
                    hint = [f"{m!r} is written by this or a later stage" if m in later else f"no column {m!r}"
                            for m in missing]
                    problems.append(f"{where}.{key}: {'; '.join(hint)} (columns here: {', '.join(sorted(available))})")
        if sc.output in (input_columns or []):
            problems.append(f"{where}.output: {sc.output!r} is already an input column")
        available.add(sc.output)
    if problems and raise_on_error:
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the config", problems)
    return problems
