"""mergekit 0.1.5's merge configuration model, restated without its imports (mergekit's own module imports torch,
transformers and PEFT: seconds). Checking and planning a recipe use this one; a merge that mergekit runs is
validated again by mergekit's own. Same class, field and validator names (a validator's name is part of an
error's path inside a union), types and messages, so pydantic reports the same problems at the same paths;
``tests/test_merge_config.py`` compares the two.
"""

from typing import Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, model_validator

ScalarParameter = Union[bool, int, float, str]
ScalarOrGradient = Union[ScalarParameter, List[ScalarParameter]]


class ModelPath(BaseModel, frozen=True):
    path: str
    revision: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def validate_string(cls, value):
        """``path`` or ``path@revision``."""
        if not isinstance(value, str):
            return value
        if value.count("@") > 1:
            raise RuntimeError(f"Invalid model path - multiple @: {value}")
        path, at, revision = value.partition("@")
        return {"path": path, "revision": revision} if at else {"path": path}

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


class ModelReference(BaseModel, frozen=True):
    model: ModelPath
    lora: Optional[ModelPath] = None
    override_architecture: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def validate_string(cls, value):
        """``model`` or ``model+lora``."""
        if not isinstance(value, str):
            return value
        parts = value.split("+")
        if len(parts) > 2:
            raise RuntimeError(f"Can't parse {value}")
        return dict(zip(("model", "lora"), parts))

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)


class ConditionalParameter(BaseModel):
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, List[ConditionalParameter], ScalarOrGradient]


class InputSliceDefinition(BaseModel):
    model: ModelReference
    layer_range: Tuple[int, int]
    parameters: Optional[Dict[str, ParameterSetting]] = None


class InputModelDefinition(BaseModel):
    model: ModelReference
    parameters: Optional[Dict[str, ParameterSetting]] = None


class OutputSliceDefinition(BaseModel):
    sources: List[InputSliceDefinition]
    base_model: Optional[ModelReference] = None
    residual_weight: Optional[float] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None


class OutputModuleDefinition(BaseModel):
    slices: Optional[List[OutputSliceDefinition]] = None
    models: Optional[List[InputModelDefinition]] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None

    @model_validator(mode="after")
    def validate_inputs(self):
        if bool(self.slices) == bool(self.models):
            raise RuntimeError("Must specify either output slices or models to merge")
        return self


class ModelTokenEmbedding(BaseModel, frozen=True):
    kind: Literal["model_token"]
    model: ModelReference
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def validate_token(self):
        if self.token_id is None and self.token is None:
            raise ValueError("token_id or token must be specified")
        if self.token_id is not None and self.token is not None:
            raise ValueError("only one of token_id or token may be specified")
        return self


class ZeroEmbedding(BaseModel, frozen=True):
    kind: Literal["zero"]


class TokenEmbeddingConfig(BaseModel, frozen=True):
    source: Union[ModelTokenEmbedding, ZeroEmbedding, ModelReference, None] = None
    force: bool = False


class TokenizerConfig(BaseModel, frozen=True):
    source: Union[ModelReference, Literal["union"], Literal["base"]] = "union"
    tokens: Optional[Dict[str, TokenEmbeddingConfig]] = None
    pad_to_multiple_of: Optional[int] = None


class MergeConfiguration(BaseModel):
    modules: Optional[Dict[str, OutputModuleDefinition]] = None
    slices: Optional[List[OutputSliceDefinition]] = None
    models: Optional[List[InputModelDefinition]] = None

    merge_method: str
    base_model: Optional[ModelReference] = None
    dtype: Optional[str] = None
    tokenizer_source: Union[Literal["union"], Literal["base"], ModelReference, None] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    out_dtype: Optional[str] = None
    parameters: Optional[Dict[str, ParameterSetting]] = None

    @model_validator(mode="after")
    def validate_inputs(self):
        if sum(bool(layout) for layout in (self.modules, self.slices, self.models)) != 1:
            raise RuntimeError("Exactly one of 'models', 'slices', or 'modules' must be present")
        return self

    @model_validator(mode="after")
    def validate_tokenizer(self):
        if self.tokenizer_source and self.tokenizer:
            raise RuntimeError("Cannot specify both tokenizer_source and tokenizer")
        return self
