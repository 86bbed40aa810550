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
    "AgreementLanguage",
    "Subject",
    "TemplateLanguage",
    "ToyLanguage",
    "build_corpus",
    "decode_code",
    "encode_code",
    "get_language",
    "normalize",
    "read_corpus",
    "tv_distance",
    "validity_rate",
    "write_corpus",
]
