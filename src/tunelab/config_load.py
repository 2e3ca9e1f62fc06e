"""Reading a run config: YAML and `key.sub=value` overrides into a validated RunConfig, with errors that name
the key (and the nearest valid one) or the file's line."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.errors import ConfigError
from tunelab.textio import read_utf8

if TYPE_CHECKING:
    from tunelab.config import RunConfig
from tunelab.method_config import METHOD_CLASSES
from tunelab.objective_config import OBJECTIVE_CLASSES

# Names other tools use for our keys, so the error can point users coming from them to the right one.
_KEY_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
}


def _nearest_key(section: type[BaseModel], key: str) -> str | None:
    names = list(section.model_fields)
    if _KEY_ALIASES.get(key) in names:
        return _KEY_ALIASES[key]
    found = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return found[0] if found else None


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (used to suggest a key)."""
    from tunelab.config import RunConfig  # the schema imports this module's loader for its callers

    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None:
            return section if str(part) in METHOD_CLASSES else None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = annotation
        elif str(part) in _UNIONS:
            continue
        else:
            return None
    return section




_OBJECTIVE_CLASSES = OBJECTIVE_CLASSES
_UNIONS: dict[str, dict[str, type[BaseModel]]] = {"method": METHOD_CLASSES, "objective": _OBJECTIVE_CLASSES}
"""Sections that are a discriminated union on `name`, and the class of each name."""


def _format_error(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    # The discriminated union puts the chosen tag into the location: ("method", "lora", "rank").
    if len(loc) >= 2 and loc[0] in _UNIONS and loc[1] in _UNIONS[loc[0]]:
        key = ".".join([str(loc[0]), *map(str, loc[2:])])
        section: type[BaseModel] | None = _UNIONS[loc[0]][loc[1]]
    else:
        key = ".".join(map(str, loc))
        section = _section_at(loc)
    if error["type"] == "extra_forbidden":
        suggestion = _nearest_key(section, str(loc[-1])) if section else None
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        valid = ", ".join(section.model_fields) if section else ""
        return f"{source}: unknown key '{key}'{hint} (valid keys here: {valid})"
    if error["type"] == "union_tag_invalid":  # method.name or objective.name that names nothing
        return (f"{source}: {key}.name: '{error['ctx']['tag']}' is not one of "
                f"{', '.join(_UNIONS.get(str(loc[0]), {})) or error['ctx']['expected_tags']}")
    if not loc:  # a check across sections (a model validator): its message names the keys
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    return f"{source}: {key}: {error['msg'].removeprefix('Value error, ')}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _number_or_text(value)
    return key.strip().split("."), value


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads `1e-4` as text; users mean a number."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate. Raises ConfigError."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError("config file not found", where=str(path))
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("a config file must hold a mapping of keys", where=str(path))
        tree = loaded or {}
        tree = _resolve_relative_paths(tree, Path(path).parent)
    for text in overrides:
        _method_as_mapping(tree)
        _track_as_mapping(tree)
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    _method_as_mapping(tree)
    if isinstance(tree.get("method"), dict) and "name" not in tree["method"]:
        tree["method"] = {"name": "lora", **tree["method"]}
    if isinstance(tree.get("objective"), dict) and "name" not in tree["objective"]:
        tree["objective"] = {"name": "sft", **tree["objective"]}
    try:
        from tunelab.config import RunConfig

        return RunConfig.model_validate(tree)
    except ValidationError as err:
        messages = [_format_error(e, source) for e in err.errors()]
        raise ConfigError("\n".join(messages)) from None


def _read_yaml(path: Path) -> Any:
    """A config file's YAML, or a ConfigError naming the line that breaks it."""
    text = read_utf8(path, str(path), ConfigError)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"not valid YAML ({problem})", where=where) from None


def _method_as_mapping(tree: dict[str, Any]) -> None:
    """`method: qlora` is shorthand for `method: {name: qlora}`; `objective: dpo` for `objective: {name: dpo}`."""
    for section in _UNIONS:
        if isinstance(tree.get(section), str):
            tree[section] = {"name": tree[section]}


def _track_as_mapping(tree: dict[str, Any]) -> None:
    """`track: [wandb]` is shorthand for `track: {to: [wandb]}` (so `track.project=...` can follow it)."""
    if isinstance(tree.get("track"), (list, str)):
        tree["track"] = {"to": tree["track"]}


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths, reward files, reward-model runs and a distillation teacher in a config file are relative to the
    current directory when they exist there, else to the config file's folder, so a recipe runs from anywhere."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith("tunelab:"):
            return value
        prefix = "hf:" if value.startswith("hf:") else ""
        location, query = value[len(prefix):].partition("?")[::2]
        if _found_beside(location, base):
            return f"{prefix}{base / location}" + (f"?{query}" if query else "")
        return value

    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            value = data.get(key)
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, dict) and "path" in item:
                        item["path"] = fix(item["path"])
            else:
                data[key] = fix(value)
    objective = tree.get("objective")
    if isinstance(objective, dict) and "teacher" in objective:
        objective["teacher"] = fix(objective["teacher"])
    if isinstance(objective, dict) and isinstance(objective.get("rewards"), list):
        rewards = objective["rewards"]
        for index, entry in enumerate(rewards):
            if isinstance(entry, dict) and "reward" in entry:
                entry["reward"] = _reward_beside(entry["reward"], base)
            else:
                rewards[index] = _reward_beside(entry, base)
    return tree


def _found_beside(location: str, base: Path) -> bool:
    """Whether a relative `location` is missing from the current directory but present in the config's folder."""
    return not Path(location).is_absolute() and not Path(location).exists() and (base / location).exists()


def _reward_beside(value: Any, base: Path) -> Any:
    """A reward entry (`file.py:function` or a reward-model run folder) resolved against the config's folder;
    built-in reward names are left alone."""
    if not isinstance(value, str):
        return value
    path, _, function = value.rpartition(":")
    if path.endswith(".py"):
        return f"{base / path}:{function}" if _found_beside(path, base) else value
    if not (_found_beside(value, base) and (base / value).is_dir()):
        return value
    from tunelab.objectives.rewards import BUILTINS  # only now: it loads torch

    return value if value in BUILTINS else str(base / value)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (written to every run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_absolute_paths(config):
    """`config` with every local path it names made absolute (the model, data files, a distillation teacher, reward
    files and reward-model runs that exist from here), so the run's config.yaml loads and `tunelab eval RUN` works
    from any folder; hub ids, bundled datasets and built-in rewards are left as they are."""

    def local(value: Any) -> Any:
        text = str(value)
        if text.startswith(("tunelab:", "hf:")) or Path(text).is_absolute() or not Path(text).exists():
            return value
        return type(value)(Path(text).resolve()) if isinstance(value, Path) else str(Path(text).resolve())

    def reward(value: Any) -> Any:
        if not isinstance(value, str):
            return value.model_copy(update={"reward": reward(value.reward)})
        path, _, function = value.rpartition(":")
        if path.endswith(".py"):
            return f"{local(path)}:{function}"
        from tunelab.objectives.rewards import BUILTINS  # only now: it loads torch

        return value if value in BUILTINS else local(value)

    data = config.data
    train = ([source.model_copy(update={"path": local(source.path)}) for source in data.train]
             if isinstance(data.train, list) else local(data.train))
    updates: dict[str, Any] = {"model": local(config.model),
                               "data": data.model_copy(update={"train": train, "eval": local(data.eval)
                                                               if data.eval is not None else None})}
    objective = config.objective
    if getattr(objective, "teacher", None) is not None:
        objective = objective.model_copy(update={"teacher": local(objective.teacher)})
    if getattr(objective, "rewards", None):
        objective = objective.model_copy(update={"rewards": [reward(r) for r in objective.rewards]})
    return config.model_copy(update={**updates, "objective": objective})
