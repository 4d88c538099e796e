"""Medical VQA fine-tuning, the M3AE / PMC-CLIP protocol: the pre-trained image and text towers and the fusion
encoder (question tokens attending to image tokens; fresh when pre-training had no fused term) with an answer
classifier on the fused [CLS] state, over the answers seen in training. Reports closed, open and overall accuracy
on the test split (exact match after normalisation; a test answer never seen in training counts as wrong) and,
beside them, the question-only majority baseline: each test question answered with the most frequent training
answer of the same question text (else of its answer type), i.e. the best a model could do without the image.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import torch
from torch import nn

from unimlip_train.eval.groups import carve_groups
from unimlip_train.finetune.data import batched, items, shuffled, split_samples
from unimlip_train.finetune.loop import param_groups, train_epochs
from unimlip_train.models.fusion import FusionEncoder

VAL_FRACTION = 0.1  # of train's images, when the data has no validation split
SHUFFLE_BUFFER = 4000
QUESTION_LENGTH = 40


def normalise(text: str) -> str:
    """Answers and questions compared case- and spacing-insensitively, without a final full stop."""
    return " ".join(str(text).lower().strip().rstrip(".?").split())


class VqaModel(nn.Module):
    """``logits = classifier(fusion(question tokens, image tokens)[CLS])`` (M3AE's VQA head: Linear, LayerNorm,
    GELU, Linear)."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, fusion: nn.Module, num_answers: int):
        super().__init__()
        self.image_tower, self.text_tower, self.fusion = image_tower, text_tower, fusion
        dim = text_tower.hidden_size
        self.classifier = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                        nn.Linear(2 * dim, num_answers))

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        _, image_tokens = self.image_tower(image)
        _, text_tokens = self.text_tower(input_ids, attention_mask)
        fused = self.fusion(text_tokens, attention_mask, image_tokens)
        return self.classifier(fused[:, 0].float())


def questions_of(samples: list[tuple[str, dict]]) -> list[dict]:
    """Every question of a split's samples, with its image key."""
    out = [{**qa, "key": key} for key, meta in samples for qa in meta.get("vqa", [])]
    if not out:
        raise ValueError("no questions: the samples' metadata has no 'vqa' list (shard the set with "
                         "`unimlip-shard vqa-rad / slake / vqa-manifest / synthetic-vqa`)")
    return out


def majority_baseline(train: list[dict], test: list[dict]) -> list[str]:
    """The question-only answer to each test question: most frequent training answer of that question text,
    else of its answer type, else overall (ties: the alphabetically first)."""
    by_question, by_type = defaultdict(Counter), defaultdict(Counter)
    for qa in train:
        by_question[normalise(qa["question"])][normalise(qa["answer"])] += 1
        by_type[qa["answer_type"]][normalise(qa["answer"])] += 1
    overall = sum(by_type.values(), Counter())

    def top(counts: Counter) -> str:
        return min(counts, key=lambda a: (-counts[a], a))

    return [top(by_question.get(normalise(q["question"])) or by_type.get(q["answer_type"]) or overall) for q in test]


def accuracies(predicted: list[str], questions: list[dict]) -> dict[str, float]:
    """Closed, open and overall exact-match accuracy in percent (NaN for a type with no question)."""
    out = {}
    for name, kind in (("closed", "CLOSED"), ("open", "OPEN"), ("overall", None)):
        hits = [p == normalise(q["answer"]) for p, q in zip(predicted, questions) if kind in (None, q["answer_type"])]
        out[name] = 100.0 * sum(hits) / len(hits) if hits else float("nan")
    return out


def run(args, model, cfg, tokenizer, device: torch.device, out: str) -> dict:
    """Fine-tune, select on validation, test; writes ``model.safetensors``, ``answers.json`` and the test
    ``predictions.jsonl`` into ``out``."""
    train_samples = split_samples(args.data, args.train_split)
    if args.val_split:
        val_samples, val_split, val_name = split_samples(args.data, args.val_split), args.val_split, args.val_split
    else:  # whole images (their groups) held out from train
        groups = [str(m.get("group") or k) for k, m in train_samples]
        fit, held = carve_groups([0] * len(groups), groups, VAL_FRACTION, args.seed)
        train_samples, val_samples = [train_samples[i] for i in fit], [train_samples[i] for i in held]
        val_split, val_name = args.train_split, f"{int(VAL_FRACTION * 100)}% of {args.train_split}'s images"
        print(f"no validation split: the epoch is chosen on {val_name} ({len(val_samples)} images, by group), "
              f"never on {args.test_split}", flush=True)
    train_q, val_q = questions_of(train_samples), questions_of(val_samples)
    test_q = questions_of(split_samples(args.data, args.test_split))
    answers = sorted({normalise(q["answer"]) for q in train_q})
    answer_id = {a: i for i, a in enumerate(answers)}

    torch.manual_seed(args.seed)
    for tower, lock in ((model.image_tower, args.lock_image), (model.text_tower, args.lock_text)):
        tower.unlock()
        if lock:
            tower.lock(0, "--lock")
    fusion = model.fusion if hasattr(model, "fusion") else FusionEncoder(
        model.text_tower.hidden_size, model.image_tower.num_features, cfg.model.fusion.layers, cfg.model.fusion.heads)
    vqa = VqaModel(model.image_tower, model.text_tower, fusion, len(answers)).to(device)

    def tokens(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
        tok = tokenizer([q["question"] for _, q in batch], padding=True, truncation=True,
                        max_length=min(QUESTION_LENGTH, cfg.data.text.max_length), return_tensors="pt")
        images = torch.stack([image for image, _ in batch]).to(device)
        return images, tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def pairs(split: str, questions: list[dict]):
        """(image, question) for every question of the split, image decoded once per sample."""
        wanted = defaultdict(list)
        for q in questions:
            wanted[q["key"]].append(q)
        for key, image, _ in items(cfg, args.data, split, tokenizer, frozenset(wanted), args.batch_size):
            for q in wanted[key]:
                yield image, q

    def batches(epoch: int):
        known = (p for p in pairs(args.train_split, train_q) if normalise(p[1]["answer"]) in answer_id)
        return batched(shuffled(known, SHUFFLE_BUFFER, args.seed * 1000 + epoch), args.batch_size)

    def loss_fn(batch) -> torch.Tensor:
        target = torch.tensor([answer_id[normalise(q["answer"])] for _, q in batch], device=device)
        return nn.functional.cross_entropy(vqa(*tokens(batch)), target)

    def predict(split: str, questions: list[dict]) -> tuple[list[str], list[dict]]:
        """Predicted answers and the questions they answer (in reading order)."""
        predicted, asked = [], []
        for batch in batched(pairs(split, questions), args.batch_size):
            predicted += [answers[i] for i in vqa(*tokens(batch)).argmax(dim=1).tolist()]
            asked += [q for _, q in batch]
        return predicted, asked

    groups = param_groups(vqa, [vqa.image_tower, vqa.text_tower], args.lr, args.lr_head,
                          args.weight_decay, args.layer_decay)
    steps = -(-sum(normalise(q["answer"]) in answer_id for q in train_q) // args.batch_size)
    history = train_epochs(vqa, groups, args.epochs, steps, batches, loss_fn,
                           lambda: accuracies(*predict(val_split, val_q))["overall"])
    with torch.no_grad():
        predicted, asked = predict(args.test_split, test_q)
    acc = accuracies(predicted, asked)
    base = accuracies(majority_baseline(train_q, asked), asked)
    best = max(history, key=lambda h: h["val"])
    result = {"closed_accuracy": acc["closed"], "open_accuracy": acc["open"], "overall_accuracy": acc["overall"],
              "majority_baseline": base["overall"], "majority_closed": base["closed"], "majority_open": base["open"],
              "num_questions": float(len(asked)),
              "num_closed": float(sum(q["answer_type"] == "CLOSED" for q in asked)),
              "num_answers": float(len(answers)), "best_epoch": float(best["epoch"]), "val_accuracy": best["val"]}

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in vqa.state_dict().items()},
              os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "answers.json"), "w", encoding="utf-8") as f:
        json.dump(answers, f, indent=1)
    with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for q, p in zip(asked, predicted):
            f.write(json.dumps({"qid": q.get("qid"), "key": q["key"], "question": q["question"], "answer": q["answer"],
                                "answer_type": q["answer_type"], "predicted": p}, ensure_ascii=False) + "\n")
    return {"metrics": result, "epochs": history,
            "splits": {"train": args.train_split, "val": val_name, "test": args.test_split},
            "samples": {"train": len(train_q), "val": len(val_q), "test": len(asked)}}
