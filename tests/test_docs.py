"""Every ```python block of README.md and docs/**/*.md runs as a test (DEVELOPERS.md: "Docs code blocks are tests").

One test per block, with the id ``FILE:LINE`` (the line of the opening fence). The blocks of a page run in
order in one namespace, as a reader would run them; selecting a single block runs the page's earlier blocks
first. Nothing is skipped unless the markdown says so.

Markers are HTML comments (hidden in the rendered docs) on the line just before the fence:

* ``<!-- test: setup=NAME[,NAME...] -->``: run the stand-ins ``setup_NAME`` below just before the block; they
  define, in the page's namespace, what the doc leaves to the reader (a batch, a data loader, a checkpoint
  file, a process group, a model built on another page).
* ``<!-- test: skip reason="..." -->``: do not run the block; the test is reported as skipped with the reason.
* ``<!-- test: signature -->``: the block is a call signature ``name(params) -> result``; its parameters must
  be those of ``inspect.signature(name)`` (names, kinds, defaults).
* ``<!-- test: torch=2.9 -->`` (alone or after ``setup=...``): the block uses what that torch release brought; on
  an older torch it is reported as skipped with the release (docs/compat.md).

A block whose first line starts with ``>>>`` runs as a doctest (shown output is compared). Any other marker,
a marker not followed by a python block, an unknown setup or a skip without a reason fails.

The docstrings' ``>>>`` examples run as doctests too, and must sit in a Google-style ``Examples:`` section,
which the API reference renders as code (``hooks/rendered_text.py`` also fails the build on a doctest rendered as
quotes).

Always on, for every block (the tiny stand-ins that keep this module fast on 2 CPU cores):

* ``timm.create_model`` builds the models of ``SMALL_MODELS``: ``vit_base_patch16_224`` keeps its width
  (768) and heads (12), which the docs' code relies on, but has 6 blocks, 56-pixel patches (4 x 4 tokens at
  224 px), MLP ratio 1 and no weight initialisation; any other model name fails until it is added there.
* The working directory is a fresh temporary directory per page (the docs' relative file names land there).
* One torch thread: on these tiny shapes a second thread only adds synchronisation (and on a shared CI machine,
  waits for a busy core).
* ``DeprecationWarning``, ``PendingDeprecationWarning`` and ``FutureWarning`` are errors: the docs must not
  teach deprecated API.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import importlib
import inspect
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from versions import TORCH, TORCH_OWN_DEPRECATIONS

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_LANGS = {"python", "py", "python3", "pycon"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*test:(?P<body>.*?)-->\s*$")
_MARKER_LIKE = re.compile(r"<!--\s*test\b")


# ---------------------------------------------------------------------------------------------------------
# Collection: markdown -> blocks


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence (of the marker, for a malformed marker)
    lang: str = ""  # the fence's language; empty for a malformed marker
    code: str = ""
    setups: list[str] = field(default_factory=list)
    skip: str | None = None
    torch: tuple[int, int] | None = None  # the torch release the block needs (on an older one: skipped)
    signature: bool = False
    error: str | None = None  # a malformed marker or fence: the test fails with this message
    index: int = 0  # position among the page's blocks

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse_marker(body: str) -> dict[str, Any]:
    """``setup=a,b`` | ``skip reason="..."`` | ``signature`` | ``torch=X.Y`` (alone or after ``setup=``) -> the
    fields of a Block (a skip where the installed torch is older than ``X.Y``); ValueError otherwise."""
    try:
        tokens = shlex.split(body)
    except ValueError as e:
        raise ValueError(f"cannot parse marker {body.strip()!r}: {e}") from None
    pairs = [t.split("=", 1) if "=" in t else [t, None] for t in tokens]
    keys = [k for k, _ in pairs]
    values = dict(pairs)
    if keys == ["signature"]:
        return {"signature": True}
    if keys and keys[0] == "skip":
        reason = (values.get("reason") or "").strip()
        if sorted(keys) != ["reason", "skip"] or values["skip"] is not None or not reason:
            raise ValueError(f'a skip needs a reason and nothing else: <!-- test: skip reason="..." -->, got {body!r}')
        return {"skip": reason}
    fields: dict[str, Any] = {}
    if keys and keys[-1] == "torch":
        release = re.fullmatch(r"(\d+)\.(\d+)", values["torch"] or "")
        if release is None:
            raise ValueError(f"torch= needs a release MAJOR.MINOR, e.g. torch=2.9, got {body.strip()!r}")
        fields["torch"] = (int(release[1]), int(release[2]))
        if TORCH < fields["torch"]:
            fields["skip"] = f"needs torch >= {values['torch']}, this is torch {torch.__version__}"
        keys = keys[:-1]
        if not keys:
            return fields
    if keys == ["setup"] and values["setup"]:
        names = [n.strip() for n in values["setup"].split(",")]
        unknown = [n for n in names if n not in SETUPS]
        if unknown:
            raise ValueError(f"unknown setup {unknown} in marker {body.strip()!r}; known: {sorted(SETUPS)}")
        return {"setups": names, **fields}
    raise ValueError(
        f"unknown marker {body.strip()!r}: expected 'setup=NAME[,NAME...]', 'skip reason=\"...\"', 'signature' or "
        "'torch=X.Y'"
    )


def parse_markdown(text: str, path: str) -> list[Block]:
    """The python blocks of one markdown page, with their markers; malformed markers become failing blocks."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: tuple[int, dict[str, Any]] | None = None  # (line, fields) of a marker waiting for its block

    def marker_error(line: int, message: str) -> None:
        blocks.append(Block(path, line, error=f"{path}:{line}: {message}"))

    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m:
            indent, fence, info = m["indent"], m["fence"], m["info"].strip()
            close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            lang = info.split()[0].lower().strip("{}.") if info else ""
            if lang in PYTHON_LANGS:
                body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
                block = Block(path, i + 1, lang=lang, code="\n".join(body) + "\n")
                if j >= len(lines):
                    block.error = f"{block.id}: the python block is never closed"
                if pending is not None:
                    for key, value in pending[1].items():
                        setattr(block, key, value)
                    pending = None
                blocks.append(block)
            elif pending is not None:
                marker_error(pending[0], f"the marker is followed by a {lang or 'plain'} block, not a python block")
                pending = None
            i = j + 1
            continue
        if _MARKER_LIKE.search(lines[i]):
            if pending is not None:
                marker_error(pending[0], "two markers in a row; put everything in one")
                pending = None
            mm = _MARKER.match(lines[i])
            if mm is None:
                marker_error(i + 1, "a marker must be a single-line HTML comment on its own line")
            else:
                try:
                    pending = (i + 1, parse_marker(mm["body"]))
                except ValueError as e:
                    marker_error(i + 1, str(e))
        elif lines[i].strip() and pending is not None:
            marker_error(pending[0], "the marker must be on the line just before a python block")
            pending = None
        i += 1
    if pending is not None:
        marker_error(pending[0], "the marker is not followed by a python block")
    blocks.sort(key=lambda b: b.line)
    for k, b in enumerate(blocks):
        b.index = k
    return blocks


# ---------------------------------------------------------------------------------------------------------
# Running a page

SMALL_MODELS: dict[str, dict[str, Any]] = {
    # dim 768 and 12 heads as the docs' code needs (PrefixPool(..., dim=768), SMoPE(768, 12), the authors'
    # (H, D) = (12, 64)); 6 blocks (pools prompt blocks 0-4, SMoPE 0-5); 4 x 4 tokens at 224 px.
    "vit_base_patch16_224": dict(depth=6, patch_size=56, mlp_ratio=1.0, weight_init="skip"),
}


@contextlib.contextmanager
def small_models() -> Iterator[None]:
    import timm

    real = timm.create_model

    def create_model(name: str, *args: Any, **kwargs: Any):
        if name not in SMALL_MODELS:
            raise ValueError(f"the docs build {name!r}: add a small stand-in for it to SMALL_MODELS in {__file__}")
        model = real(name, *args, **{**SMALL_MODELS[name], **kwargs})
        with torch.no_grad():  # weight_init="skip" leaves timm's torch.empty tokens unset; Linear layers keep torch's
            for attr in ("cls_token", "reg_token", "pos_embed"):
                if isinstance(getattr(model, attr, None), torch.nn.Parameter):
                    getattr(model, attr).normal_(0.0, 0.02)
        return model

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = real


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def deprecations_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("error", category)
        for message in TORCH_OWN_DEPRECATIONS:  # torch's own, on some releases (tests/versions.py)
            warnings.filterwarnings("ignore", message, DeprecationWarning)
        yield


class Page:
    """One page's namespace, working directory and stand-ins, alive while its blocks run."""

    def __init__(self, path: str, tmp_factory: pytest.TempPathFactory):
        self.path = path
        self.tmp_factory = tmp_factory
        self.ns: dict[str, Any] = {"__name__": "__main__"}
        self.next = 0  # index of the next block to run
        self.failed: str | None = None
        self.stack = contextlib.ExitStack()
        self.cwd = tmp_factory.mktemp("doc_page")
        self.stack.enter_context(chdir(self.cwd))
        self.stack.enter_context(small_models())
        self.stack.enter_context(one_thread())

    def close(self) -> None:
        self.ns.clear()
        self.stack.close()

    def run(self, block: Block) -> None:
        """Run ``block`` (setups first); raises what the block raises, pytest's Skipped for a marked skip."""
        self.next = block.index + 1
        if block.error:
            self.failed = block.id
            raise AssertionError(block.error)
        if block.skip is not None:
            pytest.skip(f"marked in {block.id}: {block.skip}")
        try:
            with deprecations_are_errors():
                for name in block.setups:
                    self.ns.update(SETUPS[name](self))
                if block.signature:
                    check_signature(block)
                elif block.code.lstrip().startswith(">>>"):
                    run_doctest(block, self.ns)
                else:
                    exec(compile("\n" * block.line + block.code, str(ROOT / block.path), "exec"), self.ns)
        except BaseException:
            self.failed = block.id
            raise


def check_signature(block: Block) -> None:
    text = " ".join(block.code.split())
    m = re.fullmatch(r"(?P<name>[\w.]+)\((?P<params>.*)\)\s*(->\s*.+)?", text)
    if m is None:
        raise AssertionError(f"{block.id}: a signature block must be 'name(params) -> result', got {text!r}")
    module, *attrs = m["name"].split(".")
    obj: Any = importlib.import_module(module)
    for attr in attrs:
        obj = getattr(obj, attr)
    scope: dict[str, Any] = {}
    exec(f"def documented({m['params']}): pass", {module: importlib.import_module(module)}, scope)
    doc = inspect.signature(scope["documented"]).parameters
    real = inspect.signature(obj).parameters
    shown = [(p.name, p.kind.description, p.default) for p in doc.values()]
    actual = [(p.name, p.kind.description, p.default) for p in real.values()]
    assert shown == actual, f"{block.id}: the docs show {m['name']}{inspect.signature(scope['documented'])}"


def run_doctest(block: Block, ns: dict[str, Any]) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, ns, block.id, str(ROOT / block.path), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    ns.update(test.globs)
    if runner.failures:
        raise AssertionError("".join(report))


class Pages:
    """The page being run; switching pages closes the previous one (its patches, directory, process group)."""

    def __init__(self, tmp_factory: pytest.TempPathFactory):
        self.tmp_factory = tmp_factory
        self.current: Page | None = None

    def get(self, block: Block) -> Page:
        page = self.current
        if page is not None and (page.path != block.path or page.next > block.index):
            self.close()
        if self.current is None:
            self.current = Page(block.path, self.tmp_factory)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            page, self.current = self.current, None
            page.close()


# ---------------------------------------------------------------------------------------------------------
# Stand-ins, by marker name: each returns the names it defines in the page's namespace.

SETUPS: dict[str, Callable[[Page], dict[str, Any]]] = {}
_FILES: dict[str, Path] = {}  # files written once per session

IN21K_FILES = ("vit_base_in21k.pth", "my_vit_b16_in21k.pth")  # the names the docs load
AUTHORS_FILE = "output/checkpoint/task10_checkpoint.pth"


def setup(fn: Callable[[Page], dict[str, Any]]) -> Callable[[Page], dict[str, Any]]:
    SETUPS[fn.__name__[len("setup_") :]] = fn
    return fn


def _vit(num_classes: int = 100, **kwargs: Any):
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)  # small


def _loader(n: int, batch: int, classes: range = range(100)) -> torch.utils.data.DataLoader:
    x = torch.randn(n, 3, 224, 224)
    y = torch.randint(classes.start, classes.stop, (n,))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


@setup
def setup_pool_model(page: Page) -> dict[str, Any]:
    """``model``: a (small) vit_base_patch16_224 of 2 blocks, both with a 10-task PrefixPool (length 20) and NoRGa
    sigmoid gates, as the quickstart builds it; ``pool``; a batch of 4 ``images`` (also ``x``) with ``labels``;
    ``task_ids``, one task per sample."""
    import timm

    import norga

    model = _vit(depth=2)
    pool = norga.PrefixPool(num_tasks=10, num_layers=2, length=20, dim=768)
    norga.patch_vit(model, gate=norga.NoRGaGate("sigmoid"), prompt=pool, layers=[0, 1])
    images = torch.randn(4, 3, 224, 224)
    labels = torch.randint(0, 100, (4,))
    task_ids = torch.tensor([2, 0, 9, 3])
    return dict(
        torch=torch,
        timm=timm,
        norga=norga,
        model=model,
        pool=pool,
        images=images,
        x=images,
        labels=labels,
        task_ids=task_ids,
    )


@setup
def setup_pool_layer(page: Page) -> dict[str, Any]:
    """``layer``: an index into the pool's prompted layers."""
    return {"layer": 1}


@setup
def setup_tii_head(page: Page) -> dict[str, Any]:
    """Task-id inference: ``backbone_features``, an unpatched frozen model without head ((B, 768) features);
    ``tii_head``, a linear layer from them to the pool's 10 tasks."""
    backbone = _vit(num_classes=0, depth=2).eval().requires_grad_(False)
    return {"backbone_features": backbone, "tii_head": torch.nn.Linear(768, 10)}


@setup
def setup_unpatched_vit(page: Page) -> dict[str, Any]:
    """``model``: a fresh, unpatched (small) vit_base_patch16_224 with 100 classes; ``x``: a batch of 2."""
    import timm

    import norga

    return {"torch": torch, "timm": timm, "norga": norga, "model": _vit(), "x": torch.randn(2, 3, 224, 224)}


@setup
def setup_batch(page: Page) -> dict[str, Any]:
    """``images``, ``labels``: a training batch of 2 for the 100-class model."""
    return {"images": torch.randn(2, 3, 224, 224), "labels": torch.randint(0, 100, (2,))}


@setup
def setup_smope_loader(page: Page) -> dict[str, Any]:
    """``num_tasks`` = 2, ``epochs`` = 2 (so the dense warm-up stops after epoch 0) and ``loader(task)``: a real
    DataLoader, one batch of 2 random images of the task's 10 classes."""

    def loader(task: int) -> torch.utils.data.DataLoader:
        return _loader(2, 2, range(10 * task, 10 * task + 10))

    return {"num_tasks": 2, "epochs": 2, "loader": loader}


@setup
def setup_cl_stream(page: Page) -> dict[str, Any]:
    """A class-incremental stream: ``num_tasks`` = 2 tasks of 2 classes (``classes``, ``num_classes`` = 4),
    ``epochs`` = 2, ``lr`` = 1e-3, and ``train_loader(task)``: a real DataLoader, one batch with one random
    image of each of the task's classes."""
    classes = [[0, 1], [2, 3]]

    def train_loader(task: int) -> torch.utils.data.DataLoader:
        x, y = torch.randn(2, 3, 224, 224), torch.tensor(classes[task])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)

    return {"num_tasks": 2, "classes": classes, "num_classes": 4, "epochs": 2, "lr": 1e-3, "train_loader": train_loader}


@setup
def setup_eager_compile(page: Page) -> dict[str, Any]:
    """``torch.compile`` defaults to ``backend="eager"``: Dynamo still traces the whole model (``fullgraph=True``
    fails on a graph break), but inductor's C++ compilation (tens of seconds on 2 cores) is left out."""
    real = torch.compile

    def compile(model: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", "eager")
        return real(model, **kwargs)

    torch.compile = compile  # type: ignore[assignment]
    page.stack.callback(setattr, torch, "compile", real)
    page.stack.callback(torch._dynamo.reset)
    return {}


@setup
def setup_in21k_checkpoint(page: Page) -> dict[str, Any]:
    """The in21k checkpoint files the docs load (``IN21K_FILES``), in the page's directory: the state dict of
    the (small) vit_base_patch16_224 with timm's 21843-class ImageNet-21k head, as a real in21k file has."""
    if "in21k" not in _FILES:
        path = page.tmp_factory.mktemp("in21k") / "vit_base_in21k.pth"
        torch.save(_vit(num_classes=21843).state_dict(), path)
        _FILES["in21k"] = path
    for name in IN21K_FILES:
        if not (page.cwd / name).exists():
            (page.cwd / name).symlink_to(_FILES["in21k"])
    return {}


@setup
def setup_authors_checkpoint(page: Page) -> dict[str, Any]:
    """``AUTHORS_FILE``: a NoRGa checkpoint as the authors' training script saves it (``torch.save`` of
    ``{"model", "optimizer", "epoch", "args"}``, ``args`` an ``argparse.Namespace``): 10 tasks, prompts of
    length 5 on blocks 0-4 in their (layers, 2, pool, L, H, D) layout, NoRGa ``act_scale``, a 100-class head
    and some backbone tensors."""
    backbone = _vit().state_dict()
    state = {k: backbone[k] for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight")}
    state["e_prompt.prompt"] = torch.rand(5, 2, 10, 5, 12, 64) * 2 - 1
    state["e_prompt.act_scale"] = torch.ones(5, 2, 1, 1)
    state["head.weight"] = torch.randn(100, 768) * 0.02
    state["head.bias"] = torch.zeros(100)
    args = argparse.Namespace(model="vit_base_patch16_224", num_tasks=10, size=10, length=5, gate_act="sigmoid")
    path = page.cwd / AUTHORS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 19, "args": args}, path)
    return {}


CODA_FILE = "outputs/cifar-100/10-task/coda-p/models/repeat-1/task-3/class.pth"


@setup
def setup_coda_checkpoint(page: Page) -> dict[str, Any]:
    """``CODA_FILE``: a CODA-Prompt checkpoint as their learner saves it (``torch.save`` of ``ViTZoo.state_dict()``
    on the CPU): 100 components of length 8 on blocks 0-4 (``prompt.e_p_l``, ``e_k_l``, ``e_a_l``), some backbone
    tensors under ``feat.`` and a 100-class head ``last``."""
    backbone = _vit().state_dict()
    state = {f"feat.{k}": backbone[k] for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight")}
    for layer in range(5):
        state[f"prompt.e_p_{layer}"] = torch.randn(100, 8, 768) * 0.05
        state[f"prompt.e_k_{layer}"] = torch.randn(100, 768) * 0.05
        state[f"prompt.e_a_{layer}"] = torch.randn(100, 768) * 0.05
    state["last.weight"] = torch.randn(100, 768) * 0.02
    state["last.bias"] = torch.zeros(100)
    path = page.cwd / CODA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return {}


@setup
def setup_process_group(page: Page) -> dict[str, Any]:
    """A real one-process gloo group (``world_size`` = 1) for the DDP / FSDP2 blocks, destroyed with the page."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        page.stack.callback(dist.destroy_process_group)
    return {"dist": dist, "world_size": dist.get_world_size()}


@setup
def setup_smope_ddp(page: Page) -> dict[str, Any]:
    """What the skipped DDP block imports (``torch``, ``DDP``, ``norga``); ``model``: a (small) ViT with SMoPE on
    blocks 0-5, prompts and head trainable; ``epochs`` = 1; ``train_one_epoch(ddp)``: one SGD step on a batch of 2
    with the SMoPE losses; ``train_loader``: a DataLoader of one batch of 2 (the counting pass)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import norga

    model = _vit()
    norga.patch_vit(model, prompt=norga.smope_factory(num_experts=25, top_k=5, noise_eps=0.4))
    for name, p in model.named_parameters():
        p.requires_grad = ".prompt." in name or name.startswith("head.")

    def train_one_epoch(ddp: torch.nn.Module) -> None:
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
        for x, y in _loader(2, 2):
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            router, proto = norga.smope_losses(model)
            (loss + 1e-5 * router + 1e-4 * proto).backward()
            opt.step()
            opt.zero_grad()

    return dict(
        torch=torch,
        DDP=DDP,
        norga=norga,
        model=model,
        epochs=1,
        train_one_epoch=train_one_epoch,
        train_loader=_loader(2, 2),
    )


@setup
def setup_fsdp_pool_model(page: Page) -> dict[str, Any]:
    """``model``: a (small) ViT with a 10-task PrefixPool and learnable NoRGa tanh gates (their scalar alpha, tau
    are what FSDP2 refuses), backbone frozen, task 0; ``criterion`` and a batch ``x``, ``y`` of 2."""
    import norga

    model = _vit()
    norga.patch_vit(model, gate=norga.NoRGaGate("tanh"), prompt=norga.PrefixPool(10, 5, 20, 768))
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("prompt_pool", "head")) or "prefix_gate" in name)
    norga.set_task(model, 0)
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 100, (2,))
    return dict(torch=torch, norga=norga, model=model, criterion=torch.nn.CrossEntropyLoss(), x=x, y=y)


# ---------------------------------------------------------------------------------------------------------
# The tests


def _collect() -> list[Block]:
    blocks = []
    for f in DOC_FILES:
        blocks += parse_markdown(f.read_text(encoding="utf-8"), f.relative_to(ROOT).as_posix())
    return blocks


BLOCKS = _collect()
LAST = {b.path: b.index for b in BLOCKS}  # the page's last block (they are in order)
PAGE_BLOCKS = {path: [b for b in BLOCKS if b.path == path] for path in LAST}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pages]:
    pages = Pages(tmp_path_factory)
    yield pages
    pages.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block(block: Block, pages: Pages) -> None:
    page = pages.get(block)
    try:
        for earlier in PAGE_BLOCKS[block.path][page.next : block.index]:  # when run alone (-k, a node id)
            if page.failed is None and earlier.skip is None:
                try:
                    page.run(earlier)
                except Exception as e:
                    raise AssertionError(f"the earlier block {earlier.id} failed: {type(e).__name__}: {e}") from e
            page.next = earlier.index + 1
        if page.failed is not None:
            pytest.fail(f"not run: the earlier block {page.failed} of this page failed", pytrace=False)
        page.run(block)
    finally:
        if block.index == LAST[block.path]:
            pages.close()


def test_every_python_fence_is_collected() -> None:
    """An independent count of the python fences, so that no block escapes the parser."""
    fence = re.compile(r"^[ \t]*(?:`{3,}|~{3,})[ \t]*\{?\.?(?:python3?|py|pycon)\b", re.M | re.I)
    found = set()
    for f in DOC_FILES:
        text = f.read_text(encoding="utf-8")
        found |= {(f.relative_to(ROOT).as_posix(), text.count("\n", 0, m.start()) + 1) for m in fence.finditer(text)}
    assert found == {(b.path, b.line) for b in BLOCKS if b.lang}
    assert len(found) >= 20


# The collector itself: malformed markers are failing tests, never silent skips.


def test_marker_before_a_non_python_block_is_an_error() -> None:
    (block,) = parse_markdown('<!-- test: skip reason="x" -->\n```bash\nls\n```\n', "p.md")
    assert block.error is not None and "not a python block" in block.error


@pytest.mark.parametrize(
    "marker, message",
    [
        ("<!-- test: skip -->", "needs a reason"),
        ('<!-- test: skip reason="" -->', "needs a reason"),
        ("<!-- test: setup=no_such_setup -->", "unknown setup"),
        ("<!-- test: sikp reason=typo -->", "unknown marker"),
        ("<!-- test: setup=batch -->\n\nSome prose.\n", "just before a python block"),
        ("<!-- test: torch=2 -->", "needs a release MAJOR.MINOR"),
        ("<!-- test: torch=2.9 setup=batch -->", "unknown marker"),
        ('<!-- test: skip reason="x" torch=2.9 -->', "needs a reason and nothing else"),
    ],
)
def test_malformed_markers_fail(marker: str, message: str) -> None:
    blocks = parse_markdown(f"{marker}\n```python\nx = 1\n```\n", "p.md")
    errors = [b.error for b in blocks if b.error]
    assert len(errors) == 1 and message in errors[0], errors


def test_markers_attach_to_their_block() -> None:
    text = "Text.\n\n<!-- test: setup=batch,pool_layer -->\n```python\na = 1\n```\n\n```py\nb = a\n```\n"
    first, second = parse_markdown(text, "p.md")
    assert (first.line, first.setups, first.code) == (4, ["batch", "pool_layer"], "a = 1\n")
    assert (second.line, second.setups, second.index) == (8, [], 1)


def test_torch_marker_skips_on_an_older_torch_only() -> None:
    text = "<!-- test: setup=batch torch=99.0 -->\n```python\na = 1\n```\n"
    text += "<!-- test: torch=2.0 -->\n```python\nb = 1\n```\n"
    future, past = parse_markdown(text, "p.md")
    assert (future.setups, future.torch, past.setups, past.torch) == (["batch"], (99, 0), [], (2, 0))
    assert future.skip is not None and future.skip.startswith("needs torch >= 99.0, this is torch 2.")
    assert past.skip is None and past.error is None


def test_an_unmarked_failing_block_fails(tmp_path_factory: pytest.TempPathFactory) -> None:
    (block,) = parse_markdown("```python\nF.cross_entropy\n```\n", "README.md")
    page = Page("README.md", tmp_path_factory)
    try:
        with pytest.raises(NameError, match="'F' is not defined"):
            page.run(block)
        assert page.failed == block.id
    finally:
        page.close()


def test_deprecated_calls_fail(tmp_path_factory: pytest.TempPathFactory) -> None:
    (block,) = parse_markdown("```python\nimport warnings\nwarnings.warn('old', FutureWarning)\n```\n", "README.md")
    page = Page("README.md", tmp_path_factory)
    try:
        with pytest.raises(FutureWarning):
            page.run(block)
    finally:
        page.close()


def test_a_wrong_signature_fails() -> None:
    text = '<!-- test: signature -->\n```python\nnorga.patch_vit(model, *, gate=None, backend="math") -> model\n```\n'
    (block,) = parse_markdown(text, "p.md")
    with pytest.raises(AssertionError, match="the docs show"):
        check_signature(block)


def _rendered_text_hook() -> Any:
    """hooks/rendered_text.py (run by `mkdocs build`), loaded as a module."""
    import importlib.util

    path = ROOT / "hooks" / "rendered_text.py"
    spec = importlib.util.spec_from_file_location("rendered_text", path)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_docs_hook_refuses_restructuredtext_shown_as_text():
    """The hook fails on a Sphinx role or a `::` literal-block marker in a page's text, and ignores code."""
    pytest.importorskip("mkdocs")
    from types import SimpleNamespace

    from mkdocs.exceptions import PluginError

    hook = _rendered_text_hook()
    page = SimpleNamespace(file=SimpleNamespace(src_uri="api.md"))
    clean = "<p>See <code>a[::2]</code> and <a href='#x'>Prefix</a>.</p><pre><code>x :class:`y`</code></pre>"
    assert hook.on_post_page(clean, page, None) == clean
    for bad in ("<p>A :class:`norga.Prefix` here.</p>", "<p>Example::</p>", "<p>Use :func:`f`.</p>"):
        with pytest.raises(PluginError, match="reStructuredText shown as text"):
            hook.on_post_page(bad, page, None)


def test_docs_hook_refuses_doctests_shown_as_quotes():
    """The hook fails on a `>>>` example that markdown rendered (three nested block quotes, as an `Example:`
    admonition gives, or the prompt left in text) and passes one rendered as code (an `Examples:` section)."""
    markdown = pytest.importorskip("markdown")
    pytest.importorskip("mkdocs")
    from types import SimpleNamespace

    from mkdocs.exceptions import PluginError

    hook = _rendered_text_hook()
    page = SimpleNamespace(file=SimpleNamespace(src_uri="api.md"))
    code = '<div class="highlight"><pre><code><span class="gp">&gt;&gt;&gt; </span>gate(s)\n</code></pre></div>'
    assert hook.on_post_page(code, page, None) == code
    quoted = markdown.markdown(">>> gate = NoRGaGate()\n>>> gate(s)")  # what the API page showed
    assert quoted.count("<blockquote>") == 3
    for bad in (quoted, "<table><tr><td>&gt;&gt;&gt; gate(s)</td></tr></table>"):
        with pytest.raises(PluginError, match="a doctest shown as nested quotes or text"):
            hook.on_post_page(bad, page, None)


def _norga_objects() -> Iterator[Any]:
    """Every module, class, function and attribute of norga as griffe (mkdocstrings' reader) loads them, with
    their docstrings parsed Google style as the API reference does (imported names skipped)."""
    import griffe  # the test extra has it: a missing reader fails here, it does not skip

    def walk(obj: Any) -> Iterator[Any]:
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from walk(member)

    yield from walk(griffe.load("norga", search_paths=[str(ROOT)], docstring_parser="google"))


def test_docstring_examples_are_in_examples_sections():
    """Every `>>>` line of a docstring is in a Google-style `Examples:` section, which mkdocstrings renders as
    code; anywhere else (the text, an `Example:` admonition) markdown renders it as nested quotes."""
    import griffe  # the test extra has it: a missing reader fails here, it does not skip

    def prompts(text: str) -> int:
        return sum(line.lstrip().startswith(">>>") for line in text.splitlines())

    checked, wrong = 0, []
    for obj in _norga_objects():
        if obj.docstring is None or not prompts(obj.docstring.value):
            continue
        in_examples = sum(
            prompts(text)
            for section in obj.docstring.parsed
            if section.kind is griffe.DocstringSectionKind.examples
            for kind, text in section.value
            if kind is griffe.DocstringSectionKind.examples
        )
        checked += 1
        if in_examples != prompts(obj.docstring.value):
            wrong.append(obj.path)
    assert checked >= 3, "no docstring examples found: the check looks at nothing"
    assert not wrong, f"`>>>` outside an `Examples:` section (rendered as nested quotes): {wrong}"


def test_docstring_examples_run():
    """The docstrings' examples are doctests: each runs in its module's namespace and shows its real output."""
    import pkgutil

    import norga

    names = ["norga"] + [
        m.name for m in pkgutil.walk_packages(norga.__path__, "norga.") if m.name != "norga.info.__main__"
    ]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for name in names for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]
    assert len(tests) >= 3, "no docstring examples found"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        for test in tests:
            runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed (the output above shows which)"
