"""A run's data, prepared for the kind of rows its objective trains on (SFT samples, preference or feedback pairs,
prompt-only rows)."""

from __future__ import annotations

from tunelab.config import RunConfig
from tunelab.data.preference import PreparedPairs, data_kind, prepare_preference_data
from tunelab.data.prepare import PreparedData, prepare_data
from tunelab.data.prompts import PreparedPrompts, prepare_prompt_data
from tunelab.errors import ConfigError


def prepare_run_data(config: RunConfig, tokenizer, objective) -> PreparedData | PreparedPairs | PreparedPrompts:
    """The run's data, for the kind of rows its objective trains on. Raises ConfigError naming the objective and
    the data when they do not fit, DataError for bad rows."""
    kind = objective.data_kind
    if kind == "sft":
        return prepare_data(config.data, tokenizer, config.train.seed)
    found = data_kind(config.data)
    if found != kind:
        wanted = {"preference": "preference pairs (prompt/chosen/rejected)",
                  "feedback": "feedback rows (prompt/completion/label)",
                  "prompts": "prompt-only rows (a prompt column, no reply)"}[kind]
        raise ConfigError(f"'{config.objective.name}' trains on {wanted}, but the data holds "
                          f"{'SFT' if found == 'sft' else found} rows", where="objective.name")
    if kind == "prompts":
        return prepare_prompt_data(config.data, tokenizer, config.train.seed,
                                   completion_tokens=config.objective.max_new_tokens, check=objective.check_row,
                                   check_key=objective.check_key,
                                   reference_column=objective.reference_column)
    return prepare_preference_data(config.data, tokenizer, config.train.seed)
