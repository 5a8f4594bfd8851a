"""ChatModel on tiny real models: images from files, data: URIs and HTTP, multi-turn history, streaming."""

from __future__ import annotations

import base64
import itertools
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.http_remote import http_remote
from vlmops.config import InferConfig, StorageConfig, dump_config, load_config
from vlmops.conversation import ImageTagError, Message, parse_img_tags
from vlmops.data.images import ImageLoadError, load_image
from vlmops.infer.chat import ChatModel
from vlmops.infer.generation import _CudnnAttentionOff
from vlmops.infer.resolve import GENERATION_KEYS
from vlmops.models.loading import image_inputs, load_model
from vlmops.models.template import encode
from vlmops.train.rundir import CONFIG_FILE, RunInfo

QUESTION = "What colour is the shape?"


def infer(max_new_tokens: int = 12) -> InferConfig:
    return InferConfig.model_validate({"max_new_tokens": max_new_tokens})


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path) -> ChatModel:
    # the local image server is on loopback, which image URLs may reach only when the config allows it
    return ChatModel.load(tiny_model, infer_cfg=infer(), storage=StorageConfig(url_allow_networks=["127.0.0.1"]))


@pytest.fixture(scope="module")
def readable_chat(readable_model: Path) -> ChatModel:
    return ChatModel.load(readable_model, infer_cfg=infer(24))


@pytest.fixture(scope="module")
def image_server(images: dict[str, Path]) -> Iterator[str]:
    """An HTTP server on localhost serving the test images; yields its base URL."""
    with http_remote(images["red"].parent) as host:
        yield f"http://{host}"


def test_single_image_turn_is_the_deepseek_prompt_generated_greedily(
    chat_model: ChatModel, tiny_model: Path, images: dict[str, Path]
) -> None:
    query = f"<img>{images['red']}</img>{QUESTION}"
    response, history = chat_model.chat(query)
    assert history == [[query, response]]

    # The same answer, computed by hand: the deepseek template, the processor's pixels, greedy generate.
    loaded = load_model(tiny_model)
    encoded = encode(
        [Message("user", parse_img_tags(query))],
        loaded.tokenizer,
        loaded.num_image_tokens,
        add_generation_prompt=True,
    )
    ids = torch.tensor([encoded.input_ids])
    pixels = image_inputs(loaded.processor, [load_image(str(images["red"]))], torch.float32, loaded.device)
    out = loaded.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **pixels, max_new_tokens=12, do_sample=False
    )
    expected = loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert response == expected

    # The image is seen: another image gives another answer.
    other, _ = chat_model.chat(f"<img>{images['blue']}</img>{QUESTION}")
    assert other != response


def test_two_images_in_one_turn_in_order(chat_model: ChatModel, images: dict[str, Path]) -> None:
    red, blue = images["red"], images["blue"]
    red_blue, history = chat_model.chat(f"<img>{red}</img><img>{blue}</img>What differs?")
    blue_red, _ = chat_model.chat(f"<img>{blue}</img><img>{red}</img>What differs?")
    assert len(history) == 1
    assert red_blue != blue_red  # both images reach the model, in their order

    # `images=` without <image> marks puts the images before the text, as a batch job's simple record (query +
    # images) and ms-swift do; the history records them as <img> tags where they went.
    listed, history = chat_model.chat("What differs?", images=[str(red), str(blue)])
    assert history == [[f"<img>{red}</img><img>{blue}</img>What differs?", listed]]
    assert listed == red_blue
    # With marks, each fills one in order.
    marked, history = chat_model.chat("First <image>, then <image>: what differs?", images=[str(blue), str(red)])
    assert history == [[f"First <img>{blue}</img>, then <img>{red}</img>: what differs?", marked]]
    assert marked == chat_model.chat(f"First <img>{blue}</img>, then <img>{red}</img>: what differs?")[0]


def test_image_marks_not_one_per_listed_image_are_refused(chat_model: ChatModel, images: dict[str, Path]) -> None:
    """A `<image>` mark was passed to the model as text, and the listed images went after the query."""
    with pytest.raises(ImageTagError, match=r"query: 2 <image> marks for 1 listed image: write one mark per image"):
        chat_model.chat("<image> or <image>?", images=[str(images["red"])])
    with pytest.raises(ImageTagError, match=r"query: 1 <image> mark for 0 listed images"):
        chat_model.prompt_length("What is <image>?")


def test_text_only_turn(chat_model: ChatModel) -> None:
    response, history = chat_model.chat("Say hello.")
    assert isinstance(response, str)
    assert history == [["Say hello.", response]]
    with pytest.raises(ValueError, match="empty query"):
        chat_model.chat("   ")


def test_two_turn_history_has_the_seeds_shape_and_is_used(chat_model: ChatModel, images: dict[str, Path]) -> None:
    q1, q2 = f"<img>{images['red']}</img>{QUESTION}", "And what shape is it?"
    r1, h1 = chat_model.chat(q1)
    r2, h2 = chat_model.chat(q2, h1)
    assert h2 == [[q1, r1], [q2, r2]]
    assert h1 == [[q1, r1]]  # the caller's history is not modified
    without_history, _ = chat_model.chat(q2)
    assert r2 != without_history  # the first turn (and its image) is part of the second prompt
    with pytest.raises(ValueError, match=r"history\[0\]"):
        chat_model.chat(q2, [["only a query"]])


def test_stream_yields_growing_prefixes_ending_in_the_chat_answer(
    readable_chat: ChatModel, images: dict[str, Path]
) -> None:
    q1 = f"<img>{images['red']}</img>{QUESTION}"
    r1, h1 = readable_chat.chat(q1)
    pieces = list(readable_chat.chat_stream("And what shape is it?", h1))
    r2, _ = readable_chat.chat("And what shape is it?", h1)
    assert len(pieces) > 3, pieces  # word by word, not all at once
    for shorter, longer in itertools.pairwise(pieces):
        assert longer.startswith(shorter) and len(longer) > len(shorter)
    assert pieces[-1] == r2
    assert list(readable_chat.chat_stream(q1))[-1] == r1


def test_closing_the_stream_stops_generation(readable_model: Path) -> None:
    model = ChatModel.load(readable_model, infer_cfg=infer(4000))
    start = time.perf_counter()
    stream = model.chat_stream("Say hello.")
    first = next(stream)
    stream.close()  # joins the generation thread, which must stop at the next step
    assert first
    assert time.perf_counter() - start < 20  # 4000 tokens would take far longer


def test_setting_stop_ends_the_answer_and_the_stream(readable_model: Path) -> None:
    model = ChatModel.load(readable_model, infer_cfg=infer(4000))
    stop = threading.Event()
    pieces = []
    for text in model.chat_stream("Say hello.", stop=stop):  # ends by itself: nobody closes it
        pieces.append(text)
        stop.set()  # as `vlmops infer`'s Ctrl-C handler does
    tokens = len(model.loaded.tokenizer(pieces[-1], add_special_tokens=False).input_ids)
    assert 0 < tokens < 20  # stopped a step or two after the first piece, not at 4000
    assert list(model.chat_stream("Say hello.", stop=stop)) == []  # set before generation began: none at all


def test_error_in_the_generation_thread_reaches_the_caller(tiny_model: Path) -> None:
    model = ChatModel.load(tiny_model, infer_cfg=infer(20))
    calls = 0

    def fail_on_third_step(*_: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure in decode step 3")

    handle = model.loaded.model.lm_head.register_forward_hook(fail_on_third_step)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            list(model.chat_stream("Say hello."))
    finally:
        handle.remove()
    assert model.chat("Say hello.")[0] is not None  # the model is usable afterwards


def test_a_failed_answer_lets_its_cache_go_with_the_error(tiny_model: Path) -> None:
    """The error a generation raised (CUDA out of memory, say) holds the failed generation's frames and so its K/V
    cache; once the caller has handled it, that goes with it, as the collector is not there to break a cycle (on a
    GPU the retry's prefill otherwise ran beside the failed turn's cache, and ran out of memory again)."""
    import gc
    import weakref

    model = ChatModel.load(tiny_model, infer_cfg=infer(20))
    caches: list[weakref.ref[object]] = []
    calls = 0

    def remember_cache(_module: object, _args: object, kwargs: dict[str, object]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.25 / 5.17
        if cache is not None:
            caches.append(weakref.ref(cache))

    def fail_on_third_step(*_: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure in decode step 3")

    language_model = model.loaded.model.model.language_model
    handles = [
        language_model.register_forward_pre_hook(remember_cache, with_kwargs=True),
        model.loaded.model.lm_head.register_forward_hook(fail_on_third_step),
    ]
    gc.disable()
    try:
        try:
            list(model.chat_stream("Say hello."))
        except RuntimeError as err:
            assert "injected failure" in str(err)
        assert caches and caches[-1]() is None
    finally:
        gc.enable()
        for handle in handles:
            handle.remove()


def test_answers_run_with_cudnn_attention_off_and_the_switch_is_restored(chat_model: ChatModel) -> None:
    """cuDNN's SDPA builds a kernel graph for every new shape (seconds a first answer on a GPU): chat keeps it off."""
    seen: list[bool] = []
    handle = chat_model.loaded.model.lm_head.register_forward_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )
    try:
        assert torch.backends.cuda.cudnn_sdp_enabled()
        chat_model.chat("Say hello.")
        list(chat_model.chat_stream("Say hello."))
        assert seen and not any(seen), seen
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after each answer
        torch.backends.cuda.enable_cudnn_sdp(False)  # a caller's own choice is kept too
        chat_model.chat("Say hello.")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
        handle.remove()


def test_overlapping_answers_restore_cudnn_attention_after_the_last_one() -> None:
    """Two answers from two threads: the first to finish leaves cuDNN off for the other; the last restores it."""
    switch = _CudnnAttentionOff()
    entered, first_done, second_done = threading.Event(), threading.Event(), threading.Event()
    during: list[bool] = []

    def second() -> None:
        with switch.held():
            entered.set()
            first_done.wait(10)
            during.append(torch.backends.cuda.cudnn_sdp_enabled())
        second_done.set()

    thread = threading.Thread(target=second)
    with switch.held():
        thread.start()
        assert entered.wait(10)
    first_done.set()
    assert second_done.wait(10)
    thread.join()
    assert during == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_hybrid_model_chats_and_streams(tiny_hybrid_model: Path, images: dict[str, Path]) -> None:
    model = ChatModel.load(tiny_hybrid_model, infer_cfg=infer())
    q1 = f"<img>{images['red']}</img><img>{images['blue']}</img>What differs?"
    r1, h1 = model.chat(q1)
    q2 = f"<img>{images['blue']}</img>And this one?"
    r2, h2 = model.chat(q2, h1)
    assert h2 == [[q1, r1], [q2, r2]]
    assert list(model.chat_stream(q1))[-1] == r1
    assert model.loaded.hybrid


def test_image_from_data_uri_equals_the_file(chat_model: ChatModel, images: dict[str, Path]) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(images["red"].read_bytes()).decode()
    from_file, _ = chat_model.chat(f"<img>{images['red']}</img>{QUESTION}")
    from_uri, history = chat_model.chat(f"<img>{data_uri}</img>{QUESTION}")
    assert from_uri == from_file
    assert data_uri in history[0][0]


def test_image_from_http_url_equals_the_file(chat_model: ChatModel, images: dict[str, Path], image_server: str) -> None:
    from_file, _ = chat_model.chat(f"<img>{images['blue']}</img>{QUESTION}")
    from_url, _ = chat_model.chat(f"<img>{image_server}/blue.png</img>{QUESTION}")
    assert from_url == from_file
    with pytest.raises(ImageLoadError, match=r"missing\.png: HTTP 404"):
        chat_model.chat(f"<img>{image_server}/missing.png</img>{QUESTION}")


def test_unreadable_image_names_the_image(chat_model: ChatModel, tmp_path: Path) -> None:
    nope = tmp_path / "nope.png"
    with pytest.raises(
        ImageLoadError, match=rf"^query: image {nope}: file not found \({nope}\); check the <img> tag's"
    ):
        chat_model.chat(f"<img>{nope}</img>{QUESTION}")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(ImageLoadError, match=rf"^query: image {not_an_image}: not a readable image"):
        chat_model.chat(f"<img>{not_an_image}</img>{QUESTION}")
    with pytest.raises(ImageLoadError, match="^query: empty image tag <img></img>: put a path or URL between"):
        chat_model.chat(f"<img></img>{QUESTION}")


def test_an_unreadable_image_is_named_by_the_argument_that_holds_it(
    chat_model: ChatModel, images: dict[str, Path], tmp_path: Path
) -> None:
    """Of several images, which one: its place in `images`, or the history turn whose <img> tag names it (as a batch
    job's reject names the record's field), with the fix for that argument."""
    red, nope = str(images["red"]), tmp_path / "nope.png"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    for call in (chat_model.chat, lambda *args: list(chat_model.chat_stream(*args)), chat_model.prompt_length):
        with pytest.raises(
            ImageLoadError, match=rf"^images\[1\]: image {nope}: file not found \({nope}\); check the path$"
        ):
            call(QUESTION, None, [red, str(nope)])
    with pytest.raises(ImageLoadError, match=rf"^images\[2\]: image {not_an_image}: not a readable image"):
        chat_model.chat(f"<img>{red}</img>{QUESTION}", None, [red, red, str(not_an_image)])
    with pytest.raises(ImageLoadError, match=r"^images\[0\]: empty image reference: give an image path or URL"):
        chat_model.chat(QUESTION, None, [""])
    history = [[f"<img>{red}</img>{QUESTION}", "Red."], [f"<img>{nope}</img>{QUESTION}", "Blue."]]
    with pytest.raises(ImageLoadError, match=rf"^history\[1\]\[0\]: image {nope}: file not found") as caught:
        chat_model.chat(QUESTION, history, [red])
    assert (caught.value.field, caught.value.kind) == ("history[1][0]", "missing_image")
    with pytest.raises(ValueError, match=r"^history\[0\]\[0\]: <img> at character 0 is never closed"):
        chat_model.chat(QUESTION, [[f"<img>{red}", "Red."]])


def test_run_folder_applies_its_adapter_and_config(lora_run: Path, tiny_model: Path, images: dict[str, Path]) -> None:
    query = f"<img>{images['red']}</img>{QUESTION}"
    tuned = ChatModel.load(lora_run)
    assert tuned.source.adapter == lora_run / "final"
    assert tuned.infer_cfg.max_new_tokens == 8  # from the run's saved config
    base = ChatModel.load(tiny_model, infer_cfg=tuned.infer_cfg)
    assert tuned.chat(query)[0] != base.chat(query)[0]
    # The same adapter applied to the base explicitly gives the same answers.
    explicit = ChatModel.load(tiny_model, adapter=lora_run, infer_cfg=tuned.infer_cfg)
    assert explicit.chat(query)[0] == tuned.chat(query)[0]


def test_given_generation_settings_keep_a_runs_other_saved_ones(tiny_model: Path, tmp_path: Path) -> None:
    """`ChatModel.load(RUN, infer_cfg=InferConfig(max_new_tokens=7))` takes the 7 and keeps the run's saved
    temperature, top-p and penalty, as `vlmops infer --model RUN --set infer.max_new_tokens=7` and
    `ChatModel.from_config` do (`with_saved_settings`); the given InferConfig replaced all of them (greedy, where the
    run samples). Given nothing, every saved setting applies, as before."""
    merged = tmp_path / "runs" / "r1" / "merged"
    shutil.copytree(tiny_model, merged)
    saved = ["infer.max_new_tokens=5", "infer.temperature=0.5", "infer.top_p=0.9", "infer.repetition_penalty=1.2"]
    (merged / CONFIG_FILE).write_text(dump_config(load_config(None, saved)))
    RunInfo(str(tiny_model), str(merged.parent), "test", "full", merged_from=str(merged.parent / "final")).write(merged)

    def generation(model: ChatModel) -> dict[str, object]:
        return model.infer_cfg.model_dump(include=set(GENERATION_KEYS))

    given = generation(ChatModel.load(merged, infer_cfg=infer(7)))
    assert given == {
        "max_new_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 0,
        "repetition_penalty": 1.2,
        "seed": 0,
    }
    assert generation(ChatModel.from_config(merged, load_config(None, ["infer.max_new_tokens=7"]))) == given
    assert generation(ChatModel.load(merged)) == {**given, "max_new_tokens": 5}


def test_unknown_model_reference_says_what_to_do() -> None:
    with pytest.raises(FileNotFoundError, match="vlmops download deepseek-vl-7b-chat"):
        ChatModel.load("deepseek-vl-7b-chat")
    with pytest.raises(ValueError, match="empty model reference"):
        ChatModel.load("")


def test_full_weights_run_loads_its_own_checkpoint(full_run: Path, images: dict[str, Path], tmp_path: Path) -> None:
    query = f"<img>{images['red']}</img>{QUESTION}"
    tuned = ChatModel.load(full_run)
    assert (tuned.source.checkpoint, tuned.source.adapter) == (full_run / "final", None)
    assert tuned.chat(query)[0] == ChatModel.load(full_run / "final", infer_cfg=tuned.infer_cfg).chat(query)[0]
    with pytest.raises(ValueError, match="full fine-tuning run"):
        ChatModel.load(full_run / "final", adapter=full_run)

    # Full weights without the tokenizer/processor files cannot be chatted with: say which files are missing.
    bare = tmp_path / "bare"
    shutil.copytree(full_run, bare)
    (bare / "final" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer/processor files"):
        ChatModel.load(bare)


def test_catalog_names_are_downloaded_like_swift_infer_model_type(tmp_path: Path) -> None:
    """`vlmops infer --model <catalog name>` fetches the model through download_model (here: a tiny one)."""
    from vlmops.config import load_config
    from vlmops.infer.resolve import catalog_resolver

    config = load_config(None, [f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path}/cache"])
    folder = catalog_resolver(config)("tiny-deepseek-vl-hybrid")
    assert (folder / "config.json").is_file()
    assert folder == tmp_path / "models" / "tiny-deepseek-vl-hybrid"
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        catalog_resolver(config)("deepseek-vl-13b-chat")
