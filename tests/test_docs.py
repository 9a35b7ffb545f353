"""The documentation points at things that exist: every relative link and anchor of the Markdown files,
every config path they (and the tools' docstrings) name, and every MODEL_ZOO table that has run records is
what `tools/sweep.py ... --table-only` writes from them."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import sweep  # noqa: E402


def _markdown_files():
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True).stdout.split()
    files = out or [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)]
    new = [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)]
    keep = sorted({f for f in files + new if not f.startswith((".", "output/", "build/"))
                   and os.path.isfile(os.path.join(REPO, f))})
    return [f for f in keep if not re.match(r"docs/zoo/[^/]+/table\.md$", f)]  # written by the sweep


MARKDOWN = _markdown_files()
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation and symbols dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", lambda m: m.group(0) if m.group(0) == "_" else "", heading.strip().lower())
    kept = [c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN"]
    return "".join(kept).replace(" ", "-")


def _anchors(path: str) -> set:
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_markdown_files_found():
    assert {"README.md", "GETTING_STARTED.md", "MODEL_ZOO.md", "docs/methods.md", "configs/README.md"} <= set(MARKDOWN)


@pytest.mark.parametrize("md", MARKDOWN)
def test_every_relative_link_exists(md):
    path = os.path.join(REPO, md)
    missing = []
    for target in LINK.findall(_outside_code(open(path).read())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            missing.append(target)
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            missing.append(target + " (no such heading)")
    assert not missing, f"{md}: broken links {missing}"


CONFIG_PATH = re.compile(r"(?<![\w/.-])((?:configs/)?[\w+.-]+(?:/[\w+.-]+)*\.yaml)\b")


def _named_configs(text: str):
    for m in CONFIG_PATH.finditer(text):
        p = m.group(1)
        if p.startswith("_") or text[max(m.start() - 1, 0)] in "}<":  # a pattern ({a,b}_voc_10+10.yaml)
            continue
        if p.startswith("configs/") or re.search(r"_(shapes|voc|coco)(_|\.yaml)", p) or p.startswith("Base-"):
            yield p


def _config_exists(p: str, here: str) -> bool:
    cands = [os.path.join(REPO, p), os.path.join(here, p), os.path.join(REPO, "configs", p)]
    if any(os.path.isfile(c) for c in cands):
        return True
    return "/" not in p and bool(glob.glob(os.path.join(REPO, "configs", "**", p), recursive=True))


DOCSTRING_FILES = sorted(glob.glob(os.path.join(REPO, "tools", "*.py")) + glob.glob(os.path.join(REPO, "examples", "*.py"))
                         + glob.glob(os.path.join(REPO, "clcl_det", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("f", MARKDOWN + [os.path.relpath(p, REPO) for p in DOCSTRING_FILES])
def test_every_config_path_named_exists(f):
    path = os.path.join(REPO, f)
    named = set(_named_configs(open(path).read()))
    missing = sorted(p for p in named if not _config_exists(p, os.path.dirname(path)))
    assert not missing, f"{f} names configs that do not exist: {missing}"


def test_readme_first_screen_has_the_install_and_run_command():
    first = open(os.path.join(REPO, "README.md")).read().splitlines()[:40]
    cmd = "pip install -e . && python tools/train_net.py --config configs/clclip/clclip_shapes_10+10.yaml"
    assert any(cmd in line for line in first)
    assert len(open(os.path.join(REPO, "README.md")).read().splitlines()) <= 130


ZOO_SECTIONS = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(REPO, "docs", "zoo", "*", "table.md")))


@pytest.mark.parametrize("section", ZOO_SECTIONS, ids=os.path.basename)
def test_zoo_table_is_rewritten_from_its_run_records_with_no_diff(section, tmp_path, monkeypatch, capsys):
    """MODEL_ZOO.md holds the section's table.md verbatim, and its command with --table-only, run on a copy
    of the committed records, writes the same table.md and table.csv."""
    table = open(os.path.join(section, "table.md")).read()
    assert table in open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    cmd = shlex.split(table.splitlines()[0])
    assert cmd[:2] == ["python", "tools/sweep.py"]
    argv = cmd[2:]
    out = argv[argv.index("--out") + 1]
    assert not os.path.isabs(out) and os.path.normpath(os.path.join(REPO, out)) == section
    shutil.copytree(section, tmp_path / out)
    monkeypatch.chdir(tmp_path)
    assert sweep.main(argv + ["--table-only"]) == 0
    capsys.readouterr()
    for name in ("table.md", "table.csv"):
        assert (tmp_path / out / name).read_text() == open(os.path.join(section, name)).read(), name
    runs = [d for d in glob.glob(os.path.join(section, "*", "seed*"))]
    assert runs and all(sorted(os.listdir(d)) == ["config.yaml", "summary.json"] for d in runs)


def test_readme_results_are_model_zoo_rows():
    """The README's few result rows are copied from MODEL_ZOO.md, not measured elsewhere."""
    readme = open(os.path.join(REPO, "README.md")).read()
    zoo = open(os.path.join(REPO, "MODEL_ZOO.md")).read()
    rows = [re.sub(r" \((lower|upper) bound\)", "", line) for line in readme.splitlines()
            if line.startswith("| [") and "configs/" in line and "±" in line]
    assert len(rows) >= 3
    for row in rows:
        assert any(z.startswith(row) for z in zoo.splitlines()), row
