"""Corpora and the evaluation/calibration windows cut from them."""

from __future__ import annotations

import pytest
import torch

from core.data import (builtin_corpus_text, calibration_windows, clean_wikitext, corpus_tokens, evaluation_windows,
                       load_text)
from core.errors import UserError


@pytest.fixture(scope="module")
def builtin_text():
    return builtin_corpus_text()


# ---------------------------------------------------------------- the built-in Wikipedia text


def test_builtin_corpus_is_plain_wikipedia_prose(builtin_text):
    assert 2_500_000 < len(builtin_text) < 3_200_000
    assert builtin_text.startswith("Anarchism is a political philosophy")
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "</ref>", "&nbsp;", "thumb|", "\n\n\n"):
        assert markup not in builtin_text, markup
    assert "Category:" not in builtin_text


def test_builtin_corpus_holds_every_article_without_redirects(builtin_text):
    # 206 pages: 100 redirects dropped, 106 articles kept, each starting a paragraph.
    for opening in ("Anarchism is", "Autism is", "Albedo", "Alabama", "Achilles"):
        assert f"\n\n{opening}" in builtin_text or builtin_text.startswith(opening), opening
    from core.data import _gensim_wiki_file, wiki_articles

    titles = [title for title, _ in wiki_articles(_gensim_wiki_file())]
    assert len(titles) == 106
    assert "AccessibleComputing" not in titles  # a redirect


def test_builtin_corpus_is_deterministic_and_cached(builtin_text, tmp_path, monkeypatch):
    assert builtin_corpus_text() == builtin_text  # from the cache file
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    assert builtin_corpus_text() == builtin_text  # rebuilt from scratch
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["enwiki-gensim-v1.txt"]


def test_clean_wikitext_keeps_prose_and_drops_markup():
    wiki = ("'''Foo''' is a [[bar|baz]] town.<ref>Smith 2001, p. 3</ref> It has {{convert|3|km}} roads.\n"
            "[[File:Foo.jpg|thumb|A picture]]\n\n== History ==\nFounded in 1900.<!-- hidden -->\n"
            "{| class=wikitable\n| a || b\n|}\n\n== References ==\n* Smith 2001\n[[Category:Towns]]")
    assert clean_wikitext(wiki) == "Foo is a baz town. It has roads.\n\nHistory\nFounded in 1900."


def test_missing_gensim_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps gensim==4.4.0"):
        builtin_corpus_text()


# ---------------------------------------------------------------- other sources


def test_text_file_source(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Zürich ist schön.\n\nZweiter Absatz.", encoding="utf-8")
    assert load_text(str(path)) == "Zürich ist schön.\n\nZweiter Absatz."


@pytest.mark.parametrize("content, problem", [(None, "does not exist"), (b"", "is empty"),
                                              (b"  \n", "is empty"), (b"caf\xe9 latin-1", "not UTF-8")])
def test_bad_text_files_are_user_errors(tmp_path, content, problem):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=problem):
        load_text(str(path))


def test_folder_is_not_a_text_source(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_text(str(tmp_path))


def test_hub_datasets_fail_with_a_user_error():
    # Without the datasets package or without a reachable hub, the message says what to do.
    for source in ("wikitext2", "c4", "hf:some/dataset:cfg:test"):
        with pytest.raises(UserError, match="pip install datasets|could not be loaded"):
            load_text(source)


# ---------------------------------------------------------------- tokens


def test_corpus_tokens_has_no_bos_and_is_cached(tmp_path, monkeypatch, demo_tokenizer):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_text("The capital of France is Paris.", encoding="utf-8")
    tokens = corpus_tokens(demo_tokenizer, str(path))
    assert tokens.dtype == torch.int64 and tokens.ndim == 1
    assert tokens.tolist() == demo_tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    assert demo_tokenizer.bos_token_id not in tokens.tolist()
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    assert torch.equal(corpus_tokens(demo_tokenizer, str(path)), tokens)
    path.write_text("Something else entirely, and longer.", encoding="utf-8")  # new mtime and size: new key
    changed = corpus_tokens(demo_tokenizer, str(path))
    assert not torch.equal(changed, tokens)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2


@pytest.mark.demo
def test_builtin_corpus_tokens(demo_tokenizer, builtin_text):
    tokens = corpus_tokens(demo_tokenizer, "builtin")
    assert 550_000 < len(tokens) < 700_000
    assert demo_tokenizer.decode(tokens[:6]).startswith("Anarchism is a political")


# ---------------------------------------------------------------- windows


def test_window_shapes_and_contents():
    tokens = torch.arange(10_000)
    evaluation = evaluation_windows(tokens, 4, 512)
    assert evaluation.shape == (4, 512) and evaluation.dtype == torch.int64
    assert torch.equal(evaluation.flatten(), torch.arange(4 * 512))  # first tokens, consecutive
    calibration = calibration_windows(tokens, 6, 512, seed=0)
    assert calibration.shape == (6, 512) and calibration.dtype == torch.int64
    assert torch.equal(calibration[:, 1:] - calibration[:, :-1], torch.ones(6, 511, dtype=torch.int64))


@pytest.mark.parametrize("n_tokens, n_eval, seqlen", [(10_000, 9, 512), (4_096, 4, 512), (2_000, 1, 999)])
def test_calibration_never_overlaps_evaluation(n_tokens, n_eval, seqlen):
    positions = torch.arange(n_tokens)  # token values = their positions
    evaluation = set(evaluation_windows(positions, n_eval, seqlen).flatten().tolist())
    for seed in range(5):
        calibration = set(calibration_windows(positions, 50, seqlen, seed=seed).flatten().tolist())
        assert not evaluation & calibration
        assert min(calibration) >= n_tokens // 2


def test_calibration_is_deterministic_for_a_seed():
    tokens = torch.arange(50_000)
    first = calibration_windows(tokens, 8, 256, seed=3)
    assert torch.equal(first, calibration_windows(tokens, 8, 256, seed=3))
    assert not torch.equal(first, calibration_windows(tokens, 8, 256, seed=4))
    assert len(set(first[:, 0].tolist())) > 1  # random starts, not one window repeated


def test_too_short_text_is_a_user_error():
    tokens = torch.arange(3_000)
    with pytest.raises(UserError, match=r"3,000 tokens.*holds 2 windows of 512"):
        evaluation_windows(tokens, 3, 512)
    with pytest.raises(UserError, match=r"calibration half \(1,500 tokens\) is shorter"):
        calibration_windows(tokens, 1, 2048)
    with pytest.raises(UserError, match="at least 1"):
        evaluation_windows(tokens, 0, 512)
