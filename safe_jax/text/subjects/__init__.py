"""Key subjects of news captions (SAFE part 1): an LLM through any OpenAI-compatible endpoint, or
offline heuristics; every subject is a verbatim span of its caption, ready for token weighting."""

from safe_jax.text.subjects.cache import default_cache_path
from safe_jax.text.subjects.extraction_report import Report
from safe_jax.text.subjects.extractor import (
    BACKENDS,
    DEFAULT_MODEL,
    Extraction,
    Record,
    SubjectExtractor,
    SubjectResult,
    extract,
    resolve_backend,
)
from safe_jax.text.subjects.llm_prompt import PROMPT_VERSION
from safe_jax.text.subjects.offline import offline_subjects
from safe_jax.text.subjects.online import ServiceError
from safe_jax.text.subjects.validate import match_phrases

__all__ = [
    "BACKENDS", "DEFAULT_MODEL", "PROMPT_VERSION", "Extraction", "Record", "Report", "ServiceError",
    "SubjectExtractor", "SubjectResult", "default_cache_path", "extract", "match_phrases", "offline_subjects",
    "resolve_backend",
]
