"""What every config section builds on."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors; attribute docstrings are the help text (JSON schema)."""

    # allow_inf_nan=False: `train.lr=.inf` (YAML's infinity) would pass `gt=0` and skip every step as non-finite
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True,
                              allow_inf_nan=False)
