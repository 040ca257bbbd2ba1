"""TFDS builders that write ArrayRecord without TensorFlow, and their reader.

tensorflow-datasets 4.9 builds a ``GeneratorBasedBuilder`` with
``file_format="array_record"`` and reads it back with ``tfds.data_source`` (random access,
what Grain wants) with no TensorFlow installed, as long as ``_info`` builds its
``DatasetInfo`` directly (``dataset_info_from_configs`` looks for metadata files next to
the builder's module). Every builder here writes the same flat record: ``text``,
``prompt``, ``image`` (encoded bytes), ``location`` and ``error``. Bad source records are
*stored* with ``error`` set, so the build never depends on ``data.bad_input``: the reader
skips and counts them or stops the run, like a local folder.

``tfds:text_folder`` packs the folder ``data.manual_dir`` (the dataset's config name is a
fingerprint of the folder, so another folder or changed files build afresh). The paper's
corpora are ``manual_dir`` builders: ``gutenberg``, ``arxiv``, ``wudao``, ``narrativexl``,
``coco_captions``; each checks for its expected files and says where to put them. Any
other ``tfds:NAME`` must already be prepared as ArrayRecord in ``data.data_dir``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.readers import LAYOUTS, layout_files
from data_pipelines.records import BadInput, Record

tfds.disable_progress_bar()
FEATURES = {"text": tfds.features.Text(), "prompt": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "location": tfds.features.Text(), "error": tfds.features.Text()}


def _example(record: Record) -> dict:
    image = record.image if isinstance(record.image, bytes) else b""
    return {"text": record.text, "prompt": record.prompt or "", "image": image,
            "location": record.location, "error": record.error}


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Records of the layout ``SHORT`` (``readers.LAYOUTS``) from files in ``manual_dir``."""

    VERSION = tfds.core.Version("1.0.0")
    SHORT = ""
    PATTERNS: tuple[str, ...] = ()
    MANUAL_DOWNLOAD_INSTRUCTIONS = "see readers.LAYOUTS"

    # TFDS looks for a checksums file beside the builder's module through ``code_path``, whose
    # package-path branch imports ``importlib_resources`` (not a dependency here, so it
    # fails with ModuleNotFoundError). These builders download nothing: no code path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        what, cls.PATTERNS, _ = LAYOUTS[cls.SHORT]
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = f"put {what} there, matching {' or '.join(cls.PATTERNS)}"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=LAYOUTS[self.SHORT][0],
                                     features=tfds.features.FeaturesDict(FEATURES))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(layout_files(self.SHORT, dl_manager.manual_dir))}

    def _generate_examples(self, files):
        read = LAYOUTS[self.SHORT][2]
        for path in files:
            for record in read(path):
                yield record.location, _example(record)


class Vist2TextFolder(_ManualBuilder):
    """A local folder of .txt / .jsonl files (the same records as ``data.source=FOLDER``)."""

    SHORT = "text_folder"


class Vist2Gutenberg(_ManualBuilder):
    """Project Gutenberg books (e.g. PG-19's ``train/*.txt``), one document per file."""

    SHORT = "gutenberg"


class Vist2Arxiv(_ManualBuilder):
    """arXiv papers as JSONL ``{"text": ...}`` (e.g. RedPajama's arxiv shards) or .tex files."""

    SHORT = "arxiv"


class Vist2Wudao(_ManualBuilder):
    """WuDaoCorpora 2.0 (Chinese): JSON files, each a list of ``{"title", "content"}``."""

    SHORT = "wudao"


class Vist2NarrativeXl(_ManualBuilder):
    """NarrativeXL: books as .txt and question records as .jsonl ``{"prompt", "response"}``
    (or ``{"text"}``); convert the release's files to these if they differ."""

    SHORT = "narrativexl"


class Vist2CocoCaptions(_ManualBuilder):
    """COCO captions: ``annotations/captions_*.json`` plus the image folders they name
    (``train2017/``, ``val2017/``); one record per image, its captions one per line."""

    SHORT = "coco_captions"


BUILDERS = {cls.SHORT: cls for cls in (Vist2TextFolder, Vist2Gutenberg, Vist2Arxiv, Vist2Wudao,
                                       Vist2NarrativeXl, Vist2CocoCaptions)}


@dataclasses.dataclass(frozen=True)
class TfdsImage:
    """A caption image left in its prepared TFDS dataset, read by index when a row needs it."""

    name: str
    data_dir: str
    index: int

    def read(self) -> bytes:
        return bytes(_cached_source(self.name, self.data_dir)[self.index]["image"])


@functools.lru_cache(maxsize=8)
def _cached_source(name: str, data_dir: str):
    return open_data_source(name, data_dir)


def default_data_dir(data_dir: str = "") -> str:
    return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = re.sub(r"[^a-z0-9]+", "_", folder.name.lower()).strip("_") or "folder"
    return f"{name[:40]}_{digest.hexdigest()[:12]}"


def prepare(name: str, data_dir: str = "", manual_dir: str = "") -> str:
    """Build ``tfds:name`` as ArrayRecord if needed; returns the name ``tfds.data_source`` reads."""
    cls = BUILDERS.get(name) or next((c for c in BUILDERS.values() if c.name == name), None)
    data_dir = default_data_dir(data_dir)
    if cls is None:
        return name  # an existing TFDS dataset, prepared elsewhere as array_record
    if cls is Vist2TextFolder:
        if not manual_dir:
            raise BadInput("data.manual_dir: tfds:text_folder needs the folder of .txt/.jsonl files")
        config = tfds.core.BuilderConfig(name=_folder_fingerprint(Path(manual_dir)))
    else:
        manual_dir = manual_dir or os.path.join(data_dir, "manual", cls.SHORT)
        config = None
    builder = cls(data_dir=data_dir, file_format="array_record", config=config)
    if not builder.is_prepared():
        layout_files(cls.SHORT, manual_dir)  # a clear message before TFDS starts
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return f"{cls.name}/{builder.builder_config.name}" if config else cls.name


def open_data_source(name: str, data_dir: str = ""):
    """The random-access ArrayRecord source of a prepared dataset's train split."""
    try:
        return tfds.data_source(name, split="train", data_dir=default_data_dir(data_dir))
    except Exception as err:  # tfds raises several types for "not found / not prepared"
        raise BadInput(f"data.source: cannot open tfds:{name} in {default_data_dir(data_dir)} as an "
                       f"ArrayRecord data source ({type(err).__name__}: {err})") from None


def tfds_records(name: str, data_dir: str, manual_dir: str, stage: str) -> Iterator[Record]:
    """Records of ``tfds:name`` (built first when it is one of ours); caption images stay in
    the dataset and are read lazily by index."""
    resolved = prepare(name, data_dir, manual_dir)
    source = open_data_source(resolved, data_dir)

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    for index in range(len(source)):
        item = source[index]
        image = item.get("image", b"")
        ref = TfdsImage(resolved, data_dir, index) if image else None
        yield Record(text(item.get("text", b"")), text(item.get("prompt", b"")) or None,
                     f"tfds:{resolved}[{index}] {text(item.get('location', b''))}".strip(),
                     text(item.get("error", b"")), ref)
