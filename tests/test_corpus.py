"""The recovery corpus's reading of GNU info manuals: nodes as text, menus and the tag table dropped."""

import gzip

from benchmarks import corpus


def test_info_nodes_become_text_without_headers_menus_or_tag_table(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_DOCUMENT", 160)
    nodes = ["File: tool.info,  Node: Top,  Next: Usage\n\nTool\n****\n\nTool counts words.\n\n"
             "* Menu:\n\n* Usage::  How to run it.\n",
             "File: tool.info,  Node: Usage,  Prev: Top\n\n1 Usage\n*******\n\n"
             "Run 'tool FILE' to count the words of FILE.\n* A list item, not a menu entry\n",
             "File: tool.info,  Node: Limits\n\n2 Limits\n********\n\n"
             + "Lines longer than memory are not read. " * 2 + "\n"]
    text = ("This is tool.info, produced by makeinfo.\n\x1f\n" + "\x1f\n".join(nodes)
            + "\x1f\nTag Table:\nNode: Top\x7f41\n\x1f\nEnd Tag Table\n")
    path = tmp_path / "tool.info.gz"
    path.write_bytes(gzip.compress(text.encode()))
    documents = corpus.info_documents(path)
    joined = "\n".join(documents)
    assert "Tool counts words." in documents[0] and "Run 'tool FILE'" in documents[0]
    assert "* A list item, not a menu entry" in joined
    assert documents[1].startswith("2 Limits")  # the third node would pass MAX_DOCUMENT: a document of its own
    for dropped in ("File:", "Menu:", "Usage::", "Tag Table", "produced by makeinfo"):
        assert dropped not in joined
