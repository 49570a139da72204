"""Check a loaded config without calling a model, listing every problem with its key path."""

from __future__ import annotations

from pathlib import Path

from modelyard.config import LoadedConfig, stage_prompt
from modelyard.errors import ConfigError, UserError
from modelyard.stages import Stage
from modelyard.strategies import strategy_for
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
        first = sc.models_used[0]
        try:
            st = Stage(sc, cfg.models[first], cfg.models[first].model, Path(loaded.base_dir))
            strategy_for(st, cfg, Path(loaded.base_dir))
        except ConfigError as e:
            problems.append(f"{where}: {e}")
        if input_columns is not None:
            for key, source, expression, extra in _strategy_sources(sc, loaded.base_dir):
                try:
                    variables = variables_of(source, expression=expression)
                except ConfigError as e:
                    problems.append(f"{where}.{key}: {e}")
                    continue
                missing = sorted(variables - available - extra)
                if missing:
                    problems.append(f"{where}.{key}: reads {', '.join(map(repr, missing))}, which it does not have "
                                    f"(it has: {', '.join(sorted(available | extra))})")
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


def _strategy_sources(sc, base_dir) -> list[tuple[str, str, bool, set[str]]]:
    """(key path, template or expression, is an expression, names it may read besides the row's
    columns) of what a cascade or route reads: `escalate_when`, the judge, the route rules."""
    out = []
    if sc.escalate_when:
        out.append(("escalate_when", sc.escalate_when, True, {sc.output}))
    j = sc.judge
    if j is not None:
        prompt = j.prompt
        if prompt is None:
            try:
                prompt = (Path(base_dir) / str(j.prompt_file)).read_text()
            except OSError:
                prompt = None  # the judge's compile step reports the missing file
        if prompt is not None:
            out.append(("judge.prompt", prompt, False, {sc.output}))
        if j.system:
            out.append(("judge.system", j.system, False, {sc.output}))
        out.append(("judge.accept_when", j.accept_when, True, {sc.output, j.output}))
    for k, r in enumerate(sc.route or []):
        if r.when:
            out.append((f"route[{k}].when", r.when, True, set()))
    return out
