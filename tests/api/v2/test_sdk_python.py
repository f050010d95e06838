"""Comfy API v2 through the official Python SDK (comfy-sdk 0.5.0), unchanged:
a real server with real ComfyUI, the SDK pointed at it through
``COMFY_BASE_URL`` and authenticated with ``api_key`` as its docs say."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from comfy_sdk import AsyncComfy, Comfy
from comfy_sdk.events import OutputReady, Progress, StatusChange
from comfy_sdk.exceptions import (
    InvalidWorkflow,
    JobFailed,
    MissingAsset,
    NotFound,
    Unauthorized,
)

from tests.api.v2.sdkflows import (
    LOAD,
    SAVE,
    invert_graph,
    is_inverted,
    long_graph,
    png_bytes,
    random_color,
    wait_until,
    write_png,
)
from tests.conftest import image_only
from tests.fakes.moto_s3 import serve_s3
from tests.servers import Server

KEY = "v2-sdk-key-" + "a" * 24
OTHER_KEY = "v2-sdk-key-" + "b" * 24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("v2sdk"), api_keys=f"{KEY},{OTHER_KEY}")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture
def base_url(server: Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """The SDK's documented way to target a deployment: COMFY_BASE_URL."""
    monkeypatch.setenv("COMFY_BASE_URL", server.url)
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    return server.url


def test_sync_flow_run_dedup_events_outputs_workflow(base_url: str, tmp_path: Path) -> None:
    color = random_color()
    photo = write_png(tmp_path / "photo.png", color)
    wf_path = tmp_path / "workflow_api.json"
    wf_path.write_text(json.dumps(invert_graph()))
    with Comfy(api_key=KEY) as client:
        wf = client.workflows.from_file(wf_path)
        asset = client.assets.from_file(photo)
        wf.set_input(LOAD, "image", asset)
        job = client.run(wf, timeout=180)
        assert job.status == "succeeded"
        assert asset.created_new is True and asset.hash.startswith("blake3:")
        (out,) = job.get_outputs(SAVE)
        assert out.type == "image" and out.content_type == "image/png"
        data = out.to_bytes()
        assert len(data) == out.size_bytes and is_inverted(data, color)
        assert out.to_bytes(range=(0, 7)) == data[:8]  # the PNG signature, by Range

        # The same bytes again: the SDK finds them by hash and uploads nothing.
        again = client.assets.from_file(shutil.copy(photo, tmp_path / "again.png"))
        wf2 = client.workflows.from_json(invert_graph("v2sdk-again"))
        wf2.set_input(LOAD, "image", again)
        job2 = client.submit(wf2)
        assert again.created_new is False and again.hash == asset.hash
        events = list(job2.events())
        assert sum(isinstance(e, StatusChange) and e.status == "succeeded" for e in events) == 1
        assert isinstance(events[-1], StatusChange) and events[-1].status == "succeeded"
        assert all(0 <= e.value <= 1 for e in events if isinstance(e, Progress))
        streamed = [e.output.id for e in events if isinstance(e, OutputReady)]
        job2.wait(timeout=60)
        (out2,) = job2.get_outputs(SAVE)
        assert set(streamed) <= {out2.id}
        assert is_inverted(out2.to_bytes(), color)

        # The workflow behind a job, and the job rehydrated by id.
        behind = client.jobs.get(job.id).get_workflow()
        assert behind.format == "api"
        assert {n: behind.graph[n]["class_type"] for n in behind.graph} == {
            LOAD: "LoadImage", "2": "ImageInvert", SAVE: "SaveImage"}


def test_the_documented_quickstart_with_the_key_from_the_environment(
        base_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK README's shape: Comfy() reading COMFY_API_KEY, set_input of a
    plain value, run, get_outputs(node)[0].to_bytes()."""
    monkeypatch.setenv("COMFY_API_KEY", KEY)
    with Comfy() as client:
        wf = client.workflows.from_json(image_only(batch=2))
        wf.set_input("1", "color", 0x123456)
        wf.set_input("1", "batch_size", 1)
        job = client.run(wf)
        (out,) = job.get_outputs("3")
        assert is_inverted(out.to_bytes(), (0x12, 0x34, 0x56))


def test_list_jobs_filters_by_labels_newest_first_across_pages(base_url: str) -> None:
    tag = uuid.uuid4().hex[:12]
    with Comfy(api_key=KEY) as client:
        first = client.submit(client.workflows.from_json(image_only(batch=1, color=1)),
                              metadata={"suite": tag})
        second = client.submit(client.workflows.from_json(image_only(batch=1, color=2)),
                               metadata={"suite": tag, "n": "2"})
        assert second.metadata == {"suite": tag, "n": "2"}
        listed = list(client.list_jobs(metadata={"suite": tag}))
        assert [s.id for s in listed] == [second.id, first.id]
        paged = list(client.list_jobs(metadata={"suite": tag}, limit=1))
        assert [s.id for s in paged] == [second.id, first.id]
        assert [s.id for s in client.list_jobs(metadata={"suite": tag, "n": "2"})] == [second.id]
        assert listed[0].metadata == {"suite": tag, "n": "2"}
        first.wait(timeout=120)
        second.wait(timeout=120)


def test_cancel_a_running_job(base_url: str) -> None:
    with Comfy(api_key=KEY) as client:
        job = client.submit(client.workflows.from_json(long_graph(seed=23)))
        wait_until(lambda: job.refresh().status == "running", "the job to run")
        job.cancel()
        assert job.status in ("canceling", "canceled")
        job.wait(timeout=120)
        assert job.status == "canceled"
        assert job.cancel().status == "canceled"  # idempotent on a finished job


def test_another_key_sees_nothing_and_bad_input_raises_typed_errors(base_url: str) -> None:
    with Comfy(api_key=KEY) as owner, Comfy(api_key=OTHER_KEY) as other, Comfy() as anonymous:
        job = owner.submit(owner.workflows.from_json(image_only(batch=1, color=3)))
        with pytest.raises(NotFound):
            other.jobs.get(job.id)
        with pytest.raises(Unauthorized):
            anonymous.jobs.get(job.id)
        with pytest.raises(Unauthorized):
            anonymous.submit(anonymous.workflows.from_json(image_only(batch=1)))
        assert job.id not in {s.id for s in other.list_jobs()}
        job.wait(timeout=120)

        broken = image_only(batch=1)
        del broken["3"]["inputs"]["images"]
        with pytest.raises(InvalidWorkflow) as invalid:
            owner.submit(owner.workflows.from_json(broken))
        assert "3" in str(invalid.value) and "images" in str(invalid.value)

        ghost = owner.workflows.from_json(invert_graph())
        ghost.set_input(LOAD, "image", {"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}})
        with pytest.raises(MissingAsset):
            owner.submit(ghost)


def test_every_output_kind_reaches_the_sdk(base_url: str) -> None:
    """Images (PNG, animated WebP, previews), video, audio, text and latents:
    each an output the SDK downloads, typed by the spec's OutputType."""
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0x0000FF}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "kinds", "images": ["1", 0]}},
        "3": {"class_type": "SaveAnimatedWEBP",
              "inputs": {"images": ["1", 0], "filename_prefix": "kinds", "fps": 6.0,
                         "lossless": False, "quality": 80, "method": "default"}},
        "4": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "kinds",
                                                   "codec": "vp9", "fps": 6.0, "crf": 32.0}},
        "5": {"class_type": "EmptyAudio", "inputs": {"duration": 0.25, "sample_rate": 8000,
                                                     "channels": 1}},
        "6": {"class_type": "SaveAudio", "inputs": {"audio": ["5", 0], "filename_prefix": "kinds"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": "a text output"}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0],
                                                      "filename_prefix": "kinds"}},
    }
    magic = {"image/png": b"\x89PNG", "image/webp": b"RIFF", "video/webm": b"\x1aE\xdf\xa3",
             "audio/flac": b"fLaC"}
    with Comfy(api_key=KEY) as client:
        job = client.run(client.workflows.from_json(graph), timeout=300)
        kinds: dict[str, set[tuple[str, str]]] = {}
        for out in job.outputs:
            data = out.to_bytes()
            assert len(data) == out.size_bytes > 0, out
            assert data.startswith(magic.get(out.content_type, b"")), (out, data[:8])
            kinds.setdefault(out.node_id, set()).add((out.type, out.content_type))
        assert [o.to_bytes() for o in job.get_outputs("7")] == [b"a text output"]
    assert kinds["2"] == kinds["8"] == {("image", "image/png")}
    assert len(job.get_outputs("2")) == len(job.get_outputs("8")) == 2
    assert kinds["3"] == {("image", "image/webp")}
    assert kinds["4"] == {("video", "video/webm")}
    assert kinds["6"] == {("audio", "audio/flac")}
    assert kinds["7"] == {("text", "text/plain")}
    assert len(job.get_outputs("10")) == 1


def test_a_node_failing_at_run_time_is_job_failed_naming_it(base_url: str) -> None:
    graph = {  # valid, but ImageToMask's alpha channel of an RGB image fails while running
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1,
                                                     "color": 0}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "alpha"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fail", "images": ["3", 0]}},
    }
    with Comfy(api_key=KEY) as client:
        with pytest.raises(JobFailed) as failed:
            client.run(client.workflows.from_json(graph), timeout=120)
        error = failed.value.error
        assert error.node_id == "2" and error.class_type == "ImageToMask"
        assert error.code and "IndexError" in error.message
        job = client.submit(client.workflows.from_json(graph))
        events = list(client.jobs.get(job.id).events())
        assert events[-1] == StatusChange(status="failed", queue_position=None)
        assert job.wait(timeout=60).status == "failed" and job.error.node_id == "2"


def test_asset_handles_download_urls_rehydrate_and_delete(base_url: str, tmp_path: Path) -> None:
    color = random_color()
    with Comfy(api_key=KEY) as client:
        asset = client.assets.from_bytes(png_bytes(color), filename="bytes.png")
        asset_id = asset.commit()
        url = asset.get_download_url()
        assert url.url.startswith(base_url) and url.url.endswith(f"/assets/{asset_id}/content")
        fetched = requests.get(url.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert fetched.content == png_bytes(color)
        again = client.assets.get(asset_id)
        assert (again.id, again.hash, again.file_path) == (asset_id, asset.hash, "bytes.png")

        wf = client.workflows.from_json(invert_graph("v2sdk-url"))
        wf.set_input(LOAD, "image", again)
        (out,) = client.run(wf, timeout=180).get_outputs(SAVE)
        assert out.get_download_url().url.endswith(f"/assets/{out.id}/content")
        saved = out.to_file(tmp_path / "out.png")
        assert is_inverted(saved.read_bytes(), color)

        client.assets.delete(asset_id)
        with pytest.raises(NotFound):
            client.assets.get(asset_id)
        with pytest.raises(NotFound):
            client.assets.delete(asset_id)


def test_the_partner_api_key_is_never_stored_nor_logged(base_url: str, server: Server) -> None:
    """``submit(api_key=...)`` sends ``extra_data.api_key_comfy_org``: it must
    not reach the job, its workflow, the task log, the outputs or the log."""
    secret = "partner-secret-" + uuid.uuid4().hex
    with Comfy(api_key=KEY) as client:
        job = client.submit(client.workflows.from_json(image_only(batch=1, color=9)),
                            api_key=secret)
        job.wait(timeout=120)
        assert job.status == "succeeded"
        assert secret not in json.dumps(job.get_workflow().graph)
        seen = requests.get(f"{base_url}/api/v2/jobs/{job.id}", timeout=30,
                            headers={"Authorization": f"Bearer {KEY}"}).text
        assert secret not in seen
        assert secret not in json.dumps(job.get_outputs("3")[0].to_bytes().decode("latin-1"))
    files = [p for p in Path(server.log_path).parent.rglob("*") if p.is_file()]
    assert any(job.id.encode() in p.read_bytes() for p in files)  # the scan sees the task log
    assert [p for p in files if secret.encode() in p.read_bytes()] == []


@pytest.fixture(scope="module")
def bucket_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """v2 outputs uploaded to an S3 bucket (a local moto server, another origin)."""
    with serve_s3("v2-sdk-out", {}) as endpoint:
        s = Server(tmp_path_factory.mktemp("v2sdk-s3"), api_keys=KEY, raw_env={
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true"}, storage="s3", s3_bucket="v2-sdk-out",
            s3_endpoint=endpoint, s3_region="us-east-1", s3_link_expire=300,
            v2_outputs_to_storage=1)
        try:
            yield s.wait_ready()
        finally:
            s.stop()


def test_outputs_in_a_bucket_download_through_the_redirect(
        bucket_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK follows the content endpoint's 302 to a presigned URL (without
    its bearer key: another origin) and hands that URL out as the download URL."""
    monkeypatch.setenv("COMFY_BASE_URL", bucket_server.url)
    with Comfy(api_key=KEY) as client:
        job = client.run(client.workflows.from_json(image_only(batch=2, color=0x00FF00)),
                         timeout=180)
        outs = job.get_outputs("3")
        assert len(outs) == 2
        for out in outs:
            data = out.to_bytes()
            assert data.startswith(b"\x89PNG") and len(data) == out.size_bytes
            assert out.to_bytes(range=(1, 3)) == data[1:4]
            url = out.get_download_url().url
            assert not url.startswith(bucket_server.url) and "v2-sdk-out" in url
            assert requests.get(url, timeout=30).content == data  # self-authorizing


def test_a_saved_latent_is_a_latent_output(base_url: str) -> None:
    """The spec's OutputType has ``latent`` for SaveLatent's ``.latent`` file."""
    graph = {"1": {"class_type": "EmptyLatentImage",
                   "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0],
                                                          "filename_prefix": "latent"}}}
    with Comfy(api_key=KEY) as client:
        (out,) = client.run(client.workflows.from_json(graph), timeout=120).get_outputs("2")
        assert out.type == "latent" and out.name.endswith(".latent"), (out.type, out.content_type)
        assert len(out.to_bytes()) == out.size_bytes > 0


def test_created_new_is_per_caller(base_url: str) -> None:
    """Bytes another key uploaded are new to this one: created_new says nothing
    about other accounts (not found and not yours look the same)."""
    data = png_bytes(random_color())
    with Comfy(api_key=KEY) as owner, Comfy(api_key=OTHER_KEY) as other:
        first = owner.assets.from_bytes(data, filename="mine.png")
        first.commit()
        theirs = other.assets.from_bytes(data, filename="mine.png")
        theirs.commit()
        again = other.assets.from_bytes(data, filename="again.png")
        again.commit()
    assert (first.created_new, theirs.created_new, again.created_new) == (True, True, False)
    assert first.hash == theirs.hash == again.hash and first.id != theirs.id


@pytest.mark.anyio
async def test_async_flow(base_url: str, tmp_path: Path) -> None:
    color = random_color()
    photo = write_png(tmp_path / "async.png", color)
    async with AsyncComfy(api_key=KEY) as client:
        wf = client.workflows.from_json(invert_graph("v2sdk-async"))
        asset = client.assets.from_file(photo)
        wf.set_input(LOAD, "image", asset)
        job = await client.run(wf, timeout=180)
        (out,) = job.get_outputs(SAVE)
        assert is_inverted(await out.to_bytes(), color)

        again = client.assets.from_file(photo)
        wf2 = client.workflows.from_json(invert_graph("v2sdk-async2"))
        wf2.set_input(LOAD, "image", again)
        job2 = await client.submit(wf2)
        assert again.created_new is False and again.hash == asset.hash
        seen = [e async for e in job2.events()]
        assert seen[-1].status == "succeeded"  # type: ignore[union-attr]
        await job2.wait(timeout=60)
        assert is_inverted(await job2.get_outputs(SAVE)[0].to_bytes(), color)
        assert (await job2.get_workflow()).format == "api"
        assert job2.id in [s.id async for s in client.list_jobs(limit=5)]

        long = await client.submit(client.workflows.from_json(long_graph(seed=29)))
        await long.cancel()
        await long.wait(timeout=120)
        assert long.status == "canceled"
