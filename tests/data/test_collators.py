"""Per-modality collators: shapes, masks and errors, with locally built Hugging Face processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import ViTImageProcessor, Wav2Vec2FeatureExtractor, Wav2Vec2Processor, WhisperFeatureExtractor
from transformers.utils import logging

from hf_mtl.data import SpeechCollator, TextCollator, VisionCollator, collator_for, load_digits

logging.set_verbosity_error()  # ViTImageProcessor warns that torchvision is missing and falls back to PIL

QUESTIONS = ["How far is it from Denver to Aspen ?", "What is e-coli ?", "Who is the city ?"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()["train"].select(range(6))


def _vit(**kwargs):
    return ViTImageProcessor(size={"height": 16, "width": 16}, do_rescale=False, **kwargs)


# ------------------------------------------------------------------------------------------- text


def test_text_shapes_and_mask(tokenizer):
    batch = TextCollator(tokenizer)([{"text": q, "coarse": 1} for q in QUESTIONS])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    lengths = [len(tokenizer(q)["input_ids"]) for q in QUESTIONS]  # [CLS] ... [SEP]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row, :length].eq(1).all() and batch["attention_mask"][row, length:].eq(0).all()
        assert batch["input_ids"][row, length:].eq(tokenizer.pad_token_id).all()
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id


def test_text_truncation_pairs_and_column(tokenizer):
    rows = [{"question": q, "context": "the city"} for q in QUESTIONS]
    batch = TextCollator(tokenizer, text_column="question", max_length=5)(rows)
    assert batch["input_ids"].shape == (3, 5)
    pairs = TextCollator(tokenizer, text_column="question", text_pair_column="context")(rows)
    assert pairs["token_type_ids"].max() == 1  # the second segment
    padded = TextCollator(tokenizer, text_column="question", pad_to_multiple_of=8)(rows)
    assert padded["input_ids"].shape[1] % 8 == 0


def test_text_errors(tokenizer):
    collate = TextCollator(tokenizer)
    with pytest.raises(
        ValueError, match=r"column 'text' is missing .*columns present: coarse, question.*`text_column`"
    ):
        collate([{"question": "What is e-coli ?", "coarse": 0}])
    with pytest.raises(ValueError, match=r"column 'text' must hold strings, got int in row 1"):
        collate([{"text": "What ?"}, {"text": 3}])
    with pytest.raises(ValueError, match="`tokenizer` must be a transformers tokenizer"):
        TextCollator(object())
    with pytest.raises(ValueError, match="`max_length`"):
        TextCollator(tokenizer, max_length=0)


# ----------------------------------------------------------------------------------------- vision


def test_vision_grey_images_get_a_channel(digits):
    rows = [digits[i] for i in range(4)]
    batch = VisionCollator()(rows)
    assert set(batch) == {"pixel_values"}
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert torch.allclose(batch["pixel_values"][2, 0], torch.tensor(rows[2]["pixel_values"]))
    rgb = VisionCollator(num_channels=3)(rows)["pixel_values"]
    assert rgb.shape == (4, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_vision_layouts():
    channels_last = np.random.default_rng(0).random((6, 5, 3), dtype=np.float32)
    batch = VisionCollator(image_column="img")(
        [{"img": channels_last}, {"img": torch.from_numpy(channels_last.copy())}]
    )
    assert batch["pixel_values"].shape == (2, 3, 6, 5)
    assert torch.allclose(batch["pixel_values"][0], torch.from_numpy(channels_last).permute(2, 0, 1))
    from PIL import Image

    image = Image.fromarray(np.full((4, 5, 3), 255, dtype=np.uint8))  # 4 high, 5 wide
    pil = VisionCollator()([{"image": image}])["pixel_values"]
    assert pil.shape == (1, 3, 4, 5) and torch.allclose(pil, torch.ones_like(pil))


def test_vision_with_image_processor(digits):
    rows = [digits[i] for i in range(3)]
    rgb = VisionCollator(image_processor=_vit())(rows)  # normalizes 3 channels: grey is repeated
    assert rgb["pixel_values"].shape == (3, 3, 16, 16)
    grey = collator_for(_vit(image_mean=[0.5], image_std=[0.5]))(rows)
    assert grey["pixel_values"].shape == (3, 1, 16, 16)
    # normalized as (x - 0.5) / 0.5, after resizing
    assert grey["pixel_values"].min() >= -1.01 and grey["pixel_values"].max() <= 1.01


def test_vision_errors(digits):
    with pytest.raises(ValueError, match=r"column 'pixel_values' is missing .*columns present: label, other"):
        VisionCollator()([{"other": 1, "label": 0}])
    with pytest.raises(ValueError, match="different shapes .* `image_processor`"):
        VisionCollator()([{"image": np.zeros((8, 8))}, {"image": np.zeros((9, 8))}])
    with pytest.raises(ValueError, match="only grey images can be repeated"):
        VisionCollator(num_channels=3)([{"image": np.zeros((4, 8, 8))}])
    with pytest.raises(ValueError, match="`image_processor` must be"):
        VisionCollator(image_processor=Wav2Vec2FeatureExtractor())


# ----------------------------------------------------------------------------------------- speech


def _speech_rows(fsdd, n=4):
    return [fsdd["test"][i] for i in range(0, 12 * n, 12)]  # different digits, different lengths


def test_speech_raw_padding_mask_and_normalization(fsdd_sample):
    rows = _speech_rows(fsdd_sample)
    lengths = [len(row["audio"]) for row in rows]
    assert len(set(lengths)) > 1
    batch = SpeechCollator(sampling_rate=8000)(rows)
    assert set(batch) == {"input_values", "attention_mask"}
    assert batch["input_values"].shape == (4, max(lengths)) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.long
    for i, length in enumerate(lengths):
        mask = batch["attention_mask"][i]
        assert mask[:length].eq(1).all() and mask[length:].eq(0).all()  # 1 exactly on the real samples
        real = batch["input_values"][i, :length].double()
        assert abs(real.mean()) < 1e-4 and abs(real.std(unbiased=False) - 1) < 1e-3
        assert batch["input_values"][i, length:].eq(0).all()
    raw = SpeechCollator(normalize=False)(rows)["input_values"]
    assert torch.allclose(raw[1, : lengths[1]], torch.tensor(rows[1]["audio"]))


def test_speech_raw_matches_wav2vec2_feature_extractor(fsdd_sample):
    rows = _speech_rows(fsdd_sample)
    ours = SpeechCollator()(rows)
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=8000)
    theirs = SpeechCollator(feature_extractor=extractor)(rows)
    assert set(theirs) == {"input_values", "attention_mask"}
    assert (
        torch.equal(theirs["attention_mask"], ours["attention_mask"]) and theirs["attention_mask"].dtype == torch.long
    )
    assert torch.allclose(theirs["input_values"], ours["input_values"], atol=1e-4)


def test_speech_feature_extractor_at_16khz(fsdd_sample):
    resampled = [
        {"audio": np.repeat(np.asarray(row["audio"], dtype=np.float32), 2), "sampling_rate": 16000}
        for row in _speech_rows(fsdd_sample, 3)
    ]
    collate = collator_for(Wav2Vec2FeatureExtractor())
    batch = collate(resampled)
    lengths = [len(row["audio"]) for row in resampled]
    assert batch["input_values"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    whisper = collator_for(WhisperFeatureExtractor())(resampled)
    assert whisper["input_features"].shape == (3, 80, 3000)  # Whisper keeps its own 30 s padding
    assert "attention_mask" in whisper


def test_speech_truncation_and_audio_dicts(fsdd_sample):
    rows = _speech_rows(fsdd_sample)
    batch = SpeechCollator(max_length_seconds=0.25)(rows)  # rate read from the rows: 8000 Hz
    assert batch["input_values"].shape == (4, 2000) and batch["attention_mask"].all()
    dict_rows = [{"clip": {"array": np.asarray(row["audio"]), "sampling_rate": 8000}} for row in rows]
    from_dicts = SpeechCollator(audio_column="clip", sampling_rate=8000)(dict_rows)
    assert torch.allclose(from_dicts["input_values"], SpeechCollator()(rows)["input_values"])
    padded = SpeechCollator(pad_to_multiple_of=512)(rows)
    assert padded["input_values"].shape[1] % 512 == 0


def test_speech_errors(fsdd_sample):
    rows = _speech_rows(fsdd_sample)
    with pytest.raises(
        ValueError, match=r"sampled at 8000 Hz, but the encoder expects 16000 Hz .*load_fsdd\(sampling_rate=16000\)"
    ):
        collator_for(Wav2Vec2FeatureExtractor())(rows)  # 16 kHz extractor, 8 kHz clips
    with pytest.raises(ValueError, match="sampled at 8000 Hz"):
        SpeechCollator(sampling_rate=16000)(rows)
    with pytest.raises(ValueError, match=r"mixes sampling rates \[8000, 16000\]"):
        SpeechCollator()([{"audio": [0.1, 0.2], "sampling_rate": 8000}, {"audio": [0.1], "sampling_rate": 16000}])
    with pytest.raises(ValueError, match=r"column 'audio' is missing .*columns present: digit, speech.*`audio_column`"):
        SpeechCollator()([{"speech": [0.0], "digit": 1}])
    with pytest.raises(ValueError, match="expected a mono 1-D waveform"):
        SpeechCollator()([{"audio": np.zeros((2, 100))}])
    with pytest.raises(ValueError, match="`max_length_seconds` needs a sampling rate"):
        SpeechCollator(max_length_seconds=1.0)([{"audio": np.zeros(100)}])
    with pytest.raises(ValueError, match="differs from the feature extractor's sampling_rate=16000"):
        SpeechCollator(feature_extractor=Wav2Vec2FeatureExtractor(), sampling_rate=8000)


# ----------------------------------------------------------------------------------- collator_for


def test_collator_for_picks_by_type(tokenizer):
    text = collator_for(tokenizer, text_column="question", max_length=16)
    assert isinstance(text, TextCollator) and text.text_column == "question" and text.max_length == 16
    assert isinstance(collator_for(_vit()), VisionCollator)
    speech = collator_for(Wav2Vec2FeatureExtractor(), audio_column="clip")
    assert isinstance(speech, SpeechCollator) and speech.audio_column == "clip" and speech.sampling_rate == 16000
    assert collator_for(text) is text


def test_collator_for_processor_parts(tokenizer):
    processor = Wav2Vec2Processor(feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=8000), tokenizer=tokenizer)
    speech = collator_for(processor)
    assert isinstance(speech, SpeechCollator) and speech.sampling_rate == 8000
    assert isinstance(collator_for(processor, modality="text"), TextCollator)
    with pytest.raises(ValueError, match="has no vision part .*speech, text"):
        collator_for(processor, modality="vision")


def test_collator_for_errors(tokenizer):
    with pytest.raises(
        ValueError,
        match=r"cannot build a collator from dict; expected a tokenizer \(PreTrainedTokenizerBase\), an image processor",
    ):
        collator_for({"tokenizer": tokenizer})
    with pytest.raises(ValueError, match="`modality` must be"):
        collator_for(tokenizer, modality="audio")
    with pytest.raises(ValueError, match="is a text processor"):
        collator_for(tokenizer, modality="speech")
