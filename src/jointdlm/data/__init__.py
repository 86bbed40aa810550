"""Toy languages with exact distributions and the text corpora used for training."""

from jointdlm.data.corpora import (
    CODE_NEWLINE,
    CORPORA,
    build_corpus,
    decode_code,
    encode_code,
    read_corpus,
    write_corpus,
)
from jointdlm.data.tasks import (
    TASKS,
    Task,
    TaskExample,
    accuracy,
    document,
    make_examples,
    score_all,
    write_task_prompts,
)
from jointdlm.data.toy import (
    LANGUAGES,
    AgreementLanguage,
    Subject,
    TemplateLanguage,
    ToyLanguage,
    get_language,
    normalize,
    tv_distance,
    validity_rate,
)

__all__ = [
    "CODE_NEWLINE",
    "CORPORA",
    "LANGUAGES",
    "TASKS",
    "AgreementLanguage",
    "Subject",
    "Task",
    "TaskExample",
    "TemplateLanguage",
    "ToyLanguage",
    "accuracy",
    "build_corpus",
    "decode_code",
    "document",
    "encode_code",
    "get_language",
    "make_examples",
    "normalize",
    "read_corpus",
    "score_all",
    "tv_distance",
    "validity_rate",
    "write_corpus",
    "write_task_prompts",
]
