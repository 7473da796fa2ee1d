"""Text corpora and the token windows cut from them for evaluation and calibration.

The built-in corpus is real English Wikipedia (gensim's test excerpt, CC BY-SA) turned into plain
text, so everything works offline. A corpus is split in two halves by token position: evaluation
windows come from the first half and calibration windows from the second, so calibration never
sees evaluation text whatever the settings.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError, quote_error
from core.paths import cache_dir

GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_HINT = "the built-in Wikipedia text comes with gensim's test data: pip install --no-deps gensim==4.4.0"
# Bump when the cleaning changes: the cached text and token files are keyed by it.
CLEANER_VERSION = 1
KEYWORDS = ("builtin", "wikitext2", "c4")

# Sections at the end of an article that hold references and link lists, not prose.
BACK_MATTER = {"see also", "references", "external links", "further reading", "notes", "bibliography",
               "sources", "footnotes", "notes and references", "citations"}
# Tags whose contents are not running text.
DROPPED_TAGS = {"ref", "references", "gallery", "table", "math", "timeline", "imagemap", "score",
                "syntaxhighlight", "source", "pre", "nowiki", "div"}
# [[File:...]], [[Category:...]] and interlanguage links like [[de:...]].
NON_TEXT_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
# Footnotes are removed before parsing: the parser leaves unbalanced ones as text. A match never
# crosses a paragraph or another <ref>, so an unclosed tag cannot swallow the article.
REF_TAG = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>(?:(?!<ref\b|\n\n).)*?</ref\s*>", re.S | re.I)
COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|'{2,}")
TABLE_LINE = ("|", "!", "{|", "File:", "Image:")


# ---------------------------------------------------------------- the built-in Wikipedia text


def builtin_corpus_text() -> str:
    """The built-in corpus: 106 Wikipedia articles as plain paragraphs, ~2.8 M characters.

    Built once (a few seconds) and cached under ``cache_dir()/corpus``; deterministic.
    """
    target = cache_dir() / "corpus" / f"enwiki-gensim-v{CLEANER_VERSION}.txt"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    articles = (clean_wikitext(text) for _, text in wiki_articles(_gensim_wiki_file()))
    text = "\n\n".join(article for article in articles if article)
    _write_atomic(target, text.encode("utf-8"))
    return text


def _gensim_wiki_file() -> Path:
    spec = importlib.util.find_spec("gensim")  # located, never imported: only its data file is used
    if spec is None or not spec.submodule_search_locations:
        raise UserError(GENSIM_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / GENSIM_WIKI
    if not path.is_file():
        raise UserError(GENSIM_HINT)
    return path


def wiki_articles(path: Path):
    """Yield (title, wikitext) for each page of a bz2 MediaWiki XML dump, redirects left out."""
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            text = element.findtext("{*}revision/{*}text") or ""
            redirect = element.find("{*}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            element.clear()  # keeps memory flat over the whole dump
            if not redirect and text.strip():
                yield title, text


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from one article's wiki markup: paragraphs separated by blank lines."""
    import mwparserfromhell

    code = mwparserfromhell.parse(REF_TAG.sub("", COMMENT.sub("", wikitext)))
    _drop_back_matter(code)
    # Emptying nodes in place is O(1); Wikicode.remove searches the whole tree each time.
    for tag in code.ifilter_tags(recursive=True):
        if str(tag.tag).strip().lower() in DROPPED_TAGS:
            tag.contents = ""
    for link in code.ifilter_wikilinks(recursive=True):
        if NON_TEXT_LINK.match(str(link.title)):
            link.title, link.text = "", None
    text = LEFTOVER_MARKUP.sub("", code.strip_code(normalize=True, collapse=True))
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    text = "\n".join(line for line in lines if not line.startswith(TABLE_LINE))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _drop_back_matter(code) -> None:
    from mwparserfromhell.nodes import Heading

    for index, node in enumerate(code.nodes):
        if isinstance(node, Heading) and node.level == 2 and \
                node.title.strip_code().strip().lower() in BACK_MATTER:
            del code.nodes[index:]
            return


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file and a rename (never a half file)."""
    from core.litter import sweep, temp_path

    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)  # what killed runs left
    temporary = temp_path(target, "tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


# ---------------------------------------------------------------- other sources


def load_text(source: str) -> str:
    """The text of a corpus source.

    ``source``: ``"builtin"`` (offline Wikipedia); a path to a UTF-8 text file; ``"wikitext2"``
    (wikitext-2-raw-v1 test split); ``"c4"`` (the first C4 validation shard); or
    ``"hf:<name>[:<config>][:<split>]"`` (any dataset with a text column, through ``datasets``).
    """
    source = str(source).strip()
    if source == "builtin":
        return builtin_corpus_text()
    if source == "wikitext2":
        return _dataset_text("wikitext", "wikitext-2-raw-v1", "test")
    if source == "c4":
        return _dataset_text("allenai/c4", None, "validation",
                             data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
    if source.startswith("hf:"):
        name, config, split = (source[3:].split(":") + [None, None])[:3]
        if not name:
            raise UserError(f"{source!r}: give a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1:test")
        return _dataset_text(name, config or None, split or None)
    return _file_text(Path(source).expanduser(), source)


def _file_text(path: Path, source: str) -> str:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"{source} {what}: give a UTF-8 text file, or one of {', '.join(KEYWORDS)} "
                        "or hf:<dataset>")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): save it as "
                        "UTF-8 plain text") from exc
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}): check its permissions") from exc
    if not text.strip():
        raise UserError(f"{path} is empty: give a file with text in it")
    return text


def _dataset_text(name: str, config: str | None, split: str | None, data_files: dict | None = None) -> str:
    """All rows of a dataset's text column joined with blank lines (GPTQ's WikiText-2 recipe)."""
    try:
        import datasets
    except ImportError as exc:
        raise UserError(f"the dataset {name!r} needs the datasets package: pip install datasets "
                        "(or use the builtin corpus or a text file)") from exc
    try:
        loaded = datasets.load_dataset(name, config, data_files=data_files)
    except Exception as exc:  # network, auth and format errors come in many types
        raise UserError(f"the dataset {name!r} could not be loaded ({type(exc).__name__}: "
                        f"{quote_error(exc, 200)}): the Hugging Face hub may be unreachable; use the "
                        "builtin corpus or a text file") from exc
    split = split or next((s for s in ("test", "validation", "train") if s in loaded), None)
    if split not in loaded:
        raise UserError(f"the dataset {name!r} has no split {split!r}: pick one of {', '.join(loaded)}")
    rows = loaded[split]
    column = "text" if "text" in rows.column_names else next(
        (c for c, f in rows.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise UserError(f"the dataset {name!r} has no text column (columns: {', '.join(rows.column_names)})")
    return "\n\n".join(rows[column])


# ---------------------------------------------------------------- tokens and windows


def corpus_tokens(tokenizer, source: str) -> torch.Tensor:
    """int64 [n_tokens]: the whole text of ``source`` tokenized without special tokens (no BOS).

    Cached as .npy under ``cache_dir()/tokens``, keyed by the tokenizer's contents, the source and,
    for files, their modification time and size.
    """
    target = cache_dir() / "tokens" / f"{_tokens_key(tokenizer, source)}.npy"
    if target.is_file():
        try:
            return torch.from_numpy(np.load(target, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    text = load_text(source)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    array = np.asarray(ids, dtype=np.int64)
    small = array.astype(np.int32) if len(array) and array.max() < 2**31 else array
    buffer = io.BytesIO()
    np.save(buffer, small, allow_pickle=False)
    _write_atomic(target, buffer.getvalue())
    return torch.from_numpy(array)


def _tokens_key(tokenizer, source: str) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(f"{type(tokenizer).__name__}\0{vocabulary}".encode())
    source = str(source).strip()
    if source == "builtin":
        origin = f"builtin-v{CLEANER_VERSION}"
    elif source in KEYWORDS or source.startswith("hf:"):
        origin = source
    else:
        path = Path(source).expanduser()
        stat = path.stat() if path.is_file() else None
        origin = f"{path.resolve()}\0{stat.st_mtime_ns if stat else 0}\0{stat.st_size if stat else 0}"
    digest.update(origin.encode())
    name = re.sub(r"[^\w.-]+", "-", Path(str(getattr(tokenizer, "name_or_path", "")) or "tok").name)[:40]
    return f"{name}-{digest.hexdigest()[:20]}"


def evaluation_windows(tokens: torch.Tensor, n_windows: int, seqlen: int) -> torch.Tensor:
    """int64 [n_windows, seqlen]: the first n_windows*seqlen tokens, consecutive, non-overlapping.

    ``tokens`` is int64 [n_tokens]. The windows must fit in the evaluation region (first half).
    """
    _check_sizes(n_windows, seqlen)
    region = len(tokens) // 2
    if n_windows * seqlen > region:
        raise UserError(f"the text has {len(tokens):,} tokens; its evaluation half ({region:,} tokens) holds "
                        f"{region // seqlen} windows of {seqlen}, not {n_windows}: use fewer or shorter "
                        "windows, or a longer text")
    return tokens[: n_windows * seqlen].reshape(n_windows, seqlen).to(torch.int64).clone()


def calibration_windows(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """int64 [n_samples, seqlen]: windows starting at random positions (fixed ``seed``) inside the
    calibration region, the second half of ``tokens`` (int64 [n_tokens]). Windows may overlap
    each other but never the evaluation half."""
    _check_sizes(n_samples, seqlen)
    start = len(tokens) // 2
    region = len(tokens) - start
    if region < seqlen:
        raise UserError(f"the text has {len(tokens):,} tokens; its calibration half ({region:,} tokens) is "
                        f"shorter than one window of {seqlen}: use shorter windows or a longer text")
    offsets = np.random.default_rng(seed).integers(0, region - seqlen + 1, size=n_samples)
    return torch.stack([tokens[start + o: start + o + seqlen] for o in offsets.tolist()]).to(torch.int64)


def _check_sizes(count: int, seqlen: int) -> None:
    if count < 1 or seqlen < 2:
        raise UserError(f"windows need a count of at least 1 and a length of at least 2 tokens "
                        f"(got {count} windows of {seqlen})")


# Names configs use for the longest sequence the model was trained on (first match wins), checked on
# the config and on its text part (a multimodal config nests the language model's).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length",
                "n_ctx", "max_seq_length")


def model_context_length(model_config) -> int | None:
    """The model's context in tokens, from a transformers config (object or dict); None when it says none.

    Looks for the usual names (``CONTEXT_KEYS``) on the config and then on its text config.
    """
    if model_config is None:
        return None
    configs = [model_config]
    text = model_config.get("text_config") if isinstance(model_config, dict) else getattr(model_config,
                                                                                          "text_config", None)
    if text is not None and text is not model_config:
        configs.append(text)
    for config in configs:
        for key in CONTEXT_KEYS:
            value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_window_fits(model_config, seqlen: int) -> None:
    """UserError when windows of ``seqlen`` tokens are longer than the model's context.

    model_config: a transformers config (object or dict, e.g. ``model.config``). A config that states
    no context lets every length through. Call it before the long work (calibration, evaluation).
    """
    context = model_context_length(model_config)
    if context is not None and seqlen > context:
        raise UserError(f"windows of {seqlen} tokens are longer than the model's context of {context} tokens: "
                        f"use --seqlen {context} or less (e.g. 512)")
