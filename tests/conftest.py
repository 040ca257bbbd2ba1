"""Shared test set-up: CPU only, 8 forced host devices for mesh tests, a persistent
compilation cache, and tiny configs / rows built once per session."""

import os
import struct

# Compile time is most of the suite (a cold run here: ~26 min; with the compilation cache
# warm: ~15), so the tests compile for speed: LLVM's expensive passes off and no backend
# optimisation (IEEE semantics are kept: results stay bit-identical; the compiled code is
# slower, which the tests' few steps do not notice), and every program is cached, also
# for the `vist2` subprocesses, which inherit this environment (``xla_flags`` for those
# that set their own device count).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process or subprocess with ``devices`` forced CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


from data_pipelines.rows import pack_olm_row  # noqa: E402
from vist2_jax.config import load_config  # noqa: E402
from vist2_jax.row_contract import CHUNK_ID, stack_rows  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny preset, shrunk further so a forward compiles in about a second."""
    return load_config(overrides=[
        "model.decoder.num_layers=2", "model.vision.num_layers=2", "model.decoder.vocab_size=512",
        "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
    ])


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A real SentencePiece model trained on ~120k characters of the embedded corpus."""
    from data_pipelines import corpus
    from data_pipelines.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus.write_corpus_text(root / "corpus.txt", max_chars=120_000)
    return train_tokenizer([root / "corpus.txt"], vocab_size=768, out_prefix=root / "sp")


def random_images(rng, count, size):
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def make_olm_batch(model_config, chunk_counts=((3,), (2, 2)), seq_len=96, num_slots=4, seed=0):
    """Rows of random OLM documents: ``chunk_counts[b]`` lists the chunks of each document
    packed into row b. Chunks hold ``text_len`` random tokens."""
    rng = np.random.default_rng(seed)
    layout, vocab = model_config.layout, model_config.decoder.vocab_size
    rows = []
    for docs in chunk_counts:
        documents = [[list(rng.integers(4, vocab, layout.text_len)) for _ in range(n)] for n in docs]
        images = [list(random_images(rng, n, layout.image_size)) for n in docs]
        rows.append(pack_olm_row(documents, images, seq_len=seq_len, visual_len=layout.visual_len,
                                 num_image_slots=num_slots,
                                 image_shape=(layout.image_size, layout.image_size),
                                 chunk_token=CHUNK_ID))
    return stack_rows(rows)


def pytest_terminal_summary(terminalreporter):
    """Print the figures tests measured (``record_property``), e.g. parity errors."""
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        if report.when == "call":
            rows += [(name, value) for name, value in report.user_properties]
    if rows:
        terminalreporter.section("measured by the tests")
        for name, value in sorted(rows):
            text = f"{value:.3e}" if isinstance(value, float) else str(value)
            terminalreporter.write_line(f"{name}: {text}")


def read_scalar_events(path):
    """(step, {tag: value}) per logged step of a TensorBoard file (TFRecord framing + Event
    protos; tensorboardX writes one event per scalar, merged here by step)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 16 + length
        if event.summary.value:
            if not out or out[-1][0] != event.step:
                out.append((event.step, {}))
            out[-1][1].update({v.tag: v.simple_value for v in event.summary.value})
    return out


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://vist2-test`` on a Cloud Storage emulator (see ``start_gcs_emulator``)."""
    server = start_gcs_emulator()
    yield "gs://vist2-test"
    server.stop()


def start_gcs_emulator():
    """A Cloud Storage emulator (``gcp-storage-emulator``, in memory) holding the bucket
    ``vist2-test`` on a free local port, with this process and its subprocesses pointed at
    it: gcsfs and google-cloud-storage through ``STORAGE_EMULATOR_HOST``, Orbax's TensorStore
    GCS driver through ``TENSORSTORE_GCS_HTTP_URL``. The real ``gs://`` code paths run
    against it."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                       "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "vist2-test",
                       # the emulator has no storage-control API to ask for the bucket layout
                       "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
    _report_generation_on_download()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="vist2-test")
    server.start()
    return server


def _report_generation_on_download():
    """Real GCS sends an object's generation with its bytes (``x-goog-generation``);
    TensorStore needs it for OCDBT's read-modify-write of a manifest, the emulator omits it."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "reports_generation", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    download.reports_generation = True
    objects.download = download
