"""`kronlab book`: one line per chapter, kernel noise filtered, no progress bars in pages,
real cell errors kept."""

import os
import subprocess
import sys
import textwrap

import pytest

from kronlab import book
from kronlab.book import BookBuildError, is_kernel_noise

pytest.importorskip("papermill")

NOISE = ("[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All "
         "communication (including code and outputs) is sent in plain text.")


@pytest.mark.parametrize("block, noise", [
    (NOISE + "\n", True),
    ("[IPKernelApp] ERROR | zmq socket closed\n", True),
    ("KeyboardInterrupt\n", True),
    ("Traceback (most recent call last):\n  File \"kernelapp.py\", line 1, in start\n"
     "    self.io_loop.start()\nKeyboardInterrupt\n", True),
    ("Traceback (most recent call last):\n  File \"<cell>\", line 3\nValueError: bad\n", False),
    ("[IPKernelApp] WARNING | Parent appears to have exited, shutting down.\n", True),
    ("[IPKernelApp] WARNING | some other kernel warning\n", False),
    ("UserWarning: the figure is empty\n", False),
    ("\n", False),
])
def test_kernel_noise_is_recognised(block, noise):
    assert is_kernel_noise(block) is noise


def test_blocks_group_tracebacks():
    lines = ["a\n", "Traceback (most recent call last):\n", "  File x\n", "KeyboardInterrupt\n",
             "b\n", "Traceback (most recent call last):\n", "  File y\n"]
    assert list(book._blocks(lines)) == [
        "a\n", "Traceback (most recent call last):\n  File x\nKeyboardInterrupt\n", "b\n",
        "Traceback (most recent call last):\n  File y\n"]


def test_quiet_kernels_filters_a_child_process_stderr(capfd):
    child = textwrap.dedent(f"""
        import sys
        sys.stderr.write({NOISE!r} + "\\n")
        sys.stderr.write("Traceback (most recent call last):\\n  File 'k', line 1\\nKeyboardInterrupt\\n")
        sys.stderr.write("a real warning\\n")
        sys.stderr.write("Traceback (most recent call last):\\n  File 'c', line 2\\nValueError: real\\n")
    """)
    with book._quiet_kernels():
        subprocess.run([sys.executable, "-c", child], check=True)
        print("parent stderr passes too", file=sys.stderr)
    err = capfd.readouterr().err
    assert "TCP without encryption" not in err and "KeyboardInterrupt" not in err
    assert "a real warning" in err and "ValueError: real" in err
    assert "parent stderr passes too" in err
    print("after", file=sys.stderr)  # stderr is restored
    assert capfd.readouterr().err == "after\n"


CHAPTER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# {title}

```{{code-cell}} ipython3
:tags: [parameters]
fail = False
```

```{{code-cell}} ipython3
import sys
from tqdm.auto import tqdm
for _ in tqdm(range(3)):
    pass
print("cell ran", file=sys.stderr)
if fail:
    raise ValueError("planted failure")
```
"""


@pytest.fixture
def tiny_book(tmp_path):
    root = tmp_path / "root"
    (root / "book" / "params").mkdir(parents=True)
    (root / "_config.yml").write_text("title: tiny\nexecute:\n  execute_notebooks: 'off'\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/good\nchapters:\n"
                                   "- file: book/bad\n")
    (root / "book" / "good.md").write_text(CHAPTER.format(title="Good"))
    (root / "book" / "bad.md").write_text(CHAPTER.format(title="Bad"))
    (root / "book" / "params" / "default.yaml").write_text("bad:\n  fail: true\n")
    return root


@pytest.mark.slow  # starts two Jupyter kernels
def test_build_reports_each_chapter_and_keeps_pages_clean(tiny_book, tmp_path, capfd):
    import nbformat

    out = tmp_path / "out"
    before = {k: os.environ.get(k) for k in ("TQDM_DISABLE", "PYTHONWARNINGS")}
    with pytest.raises(BookBuildError) as exc:
        book.build_book("default", root=tiny_book, out=out)
    captured = capfd.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "executing 2 chapter(s) with profile default:"
    assert lines[1].split()[0] == "good" and lines[1].endswith(" s  ok")
    assert lines[2].split()[0] == "bad" and lines[2].endswith(" s  failed")
    assert lines[3].startswith("all") and lines[3].endswith("1 ok, 1 failed")
    message = str(exc.value)
    assert "chapter bad failed" in message and "planted failure" in message
    assert "bad.failed.ipynb" in message
    assert "TCP without encryption" not in captured.err
    assert {k: os.environ.get(k) for k in before} == before

    nb = nbformat.read(out / "_build" / "site" / "book" / "good.ipynb", as_version=4)
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "cell ran" in streams  # the cell's own stderr stays in the page
    assert "it/s" not in streams and "IProgress" not in streams  # no progress bar, no warning
    assert not (out / "_build" / "html").exists()  # no site from a failed build
