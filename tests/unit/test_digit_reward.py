"""digits-tiny prompts, classifier, rewards and metrics on real held-out digits.

The classifier is trained once per module into a temp model dir's ``classifier/`` (~10 s on 2
cores), where the base build puts it, so the tests never write into ``runs/``.
"""

from __future__ import annotations

import pytest
import torch

from sdpo_core.evaluation import metrics
from sdpo_core.evaluation.metrics import get_metric
from sdpo_core.rewards import RewardError, available_rewards, build_reward, check_rewards, digits
from sdpo_core.tiny.classifier import classifier_accuracy, load_or_train_classifier


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A base model directory holding only the classifier (all the digits rewards read of it)."""
    path = tmp_path_factory.mktemp("digits") / "base"
    load_or_train_classifier(path / digits.CLASSIFIER_SUBDIR)
    return path


@pytest.fixture(scope="module")
def classifier_dir(model_dir):
    return model_dir / digits.CLASSIFIER_SUBDIR


@pytest.fixture(scope="module")
def heldout():
    images, labels = digits.load_digit_images("classifier_test")
    return images, labels.tolist()


def test_parse_digit_words_and_numerals():
    assert digits.parse_digit("a handwritten digit 7") == 7
    assert digits.parse_digit("The number SEVEN") == 7
    assert digits.parse_digit("an eight") == 8
    assert digits.parse_digit("digit 0, a zero") == 0  # the same digit twice is fine
    for d in range(10):
        assert all(digits.parse_digit(p) == d for p in digits.digit_prompts(d))


@pytest.mark.parametrize("prompt", ["a cat riding a bike", "digits 3 and 4", "the number 12", "someone"])
def test_unparsable_prompt_names_it(prompt):
    with pytest.raises(digits.DigitPromptError, match=prompt):
        digits.parse_digit(prompt)


def test_prompt_sets():
    pairs = digits.all_digit_prompts()
    assert len(pairs) == 120 and len({p for p, _ in pairs}) == 120
    assert all(len(digits.digit_prompts(d)) == 12 for d in range(10))
    vocab = set(digits.digit_vocabulary())
    assert {"seven", "handwritten", "number", "an"} <= vocab
    assert all(w in vocab for p, _ in pairs for w in p.split())


def test_splits_are_disjoint_and_fixed():
    diff, _ = digits.load_digit_images("diffusion")
    held, _ = digits.load_digit_images("heldout")
    train, _ = digits.load_digit_images("classifier_train")
    test, _ = digits.load_digit_images("classifier_test")
    assert (len(diff), len(held), len(train) + len(test)) == (1258, 539, 539)
    assert diff.shape[1:] == (3, 32, 32) and 0 <= diff.min() and diff.max() <= 1
    # no held-out image appears in the diffusion split
    dist = torch.cdist(held.flatten(1)[:, ::7], diff.flatten(1)[:, ::7])
    assert dist.min() > 0
    assert torch.equal(digits.load_digit_images("heldout")[0], held)


def test_classifier_accuracy_and_files(classifier_dir, heldout):
    model, config = digits.load_classifier(classifier_dir)
    assert config["test_accuracy"] > 0.9
    assert classifier_accuracy(model, heldout[0], torch.tensor(heldout[1])) > 0.9
    assert sorted(p.name for p in classifier_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert 40_000 < sum(p.numel() for p in model.parameters()) < 80_000


def test_correct_prompt_scores_higher(classifier_dir, heldout):
    images, labels = heldout
    reward = build_reward("digit_alignment", {"classifier_path": str(classifier_dir)})
    right = reward(images, [f"a handwritten digit {d}" for d in labels])
    wrong = reward(images, [f"the number {digits.DIGIT_WORDS[(d + 3) % 10]}" for d in labels])
    for values in (right, wrong):
        assert values.shape == (len(labels),) and values.dtype == torch.float32
        assert 0 <= values.min() and values.max() <= 1
        check_rewards("digit_alignment", values, len(labels))
    assert right.mean() > 0.9 and wrong.mean() < 0.1


def test_bold_reward_keeps_digit_factor(classifier_dir, heldout):
    images, labels = heldout
    opts = {"classifier_path": str(classifier_dir)}
    prompts = [str(d) for d in labels]
    plain = build_reward("digit_alignment", opts)(images, prompts)
    bold = build_reward("digit_alignment_bold", opts)
    real = bold(images, prompts)
    assert real.dtype == torch.float32 and real.shape == (len(labels),)
    assert torch.all(real <= plain + 1e-6) and 0.5 < real.mean() < 0.8  # room above real digits
    # wider strokes (dilated by one pixel) score higher; the digit probability stays a factor
    wider = torch.nn.functional.max_pool2d(images, 3, 1, 1)
    assert bold(wider, prompts).mean() > real.mean() + 0.1
    assert bold(torch.ones(2, 3, 32, 32), ["a one", "a two"]).max() < 0.5  # all ink: bold, but no digit
    half = build_reward("digit_alignment_bold", {**opts, "weight": 0.5})(images, prompts)
    assert torch.allclose(half, (plain + real) / 2, atol=1e-6)  # weight mixes plain and full-bold rewards


def test_reward_errors(classifier_dir):
    reward = build_reward("digit_alignment", {"classifier_path": str(classifier_dir)})
    with pytest.raises(digits.DigitPromptError, match="a photo of a cat"):
        reward(torch.rand(1, 3, 32, 32), ["a photo of a cat"])
    with pytest.raises(RewardError, match="no option"):
        build_reward("digit_alignment", {"classifier_path": str(classifier_dir), "temperature": 2})
    assert {"digit_alignment", "digit_alignment_bold"} <= set(available_rewards())


def test_metrics(model_dir, heldout):
    images, labels = heldout
    prompts = [f"digit {digits.DIGIT_WORDS[d]}" for d in labels]
    group = torch.tensor(labels)
    assert get_metric("digit_accuracy", model_dir=str(model_dir))(images, prompts, group) > 0.9
    same = images[:1].expand(6, -1, -1, -1)
    assert get_metric("diversity")(same, prompts[:6], torch.tensor([0, 0, 0, 1, 1, 2])) == 0.0
    # two images differing by 1 in every pixel are at distance exactly 1 after normalising
    pair = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    assert get_metric("diversity")(pair, ["a", "b"], torch.tensor([0, 0])) == pytest.approx(1.0)
    assert 0.1 < metrics.real_data_diversity() < 0.4
    # 0.30 of a real digit's pixels are above 0.5: boldness 0.30 / 0.45
    assert get_metric("boldness")(images, prompts, group) == pytest.approx(0.67, abs=0.05)


def test_classifier_found_in_model_dir_from_any_working_directory(model_dir, classifier_dir, heldout,
                                                                  tmp_path, monkeypatch):
    """The rewards and digit_accuracy read MODEL_DIR/classifier, not a path under the working
    directory: from elsewhere they score exactly as with the explicit path and write nothing there
    (the old cwd-relative default trained a fresh classifier into ./runs/)."""
    images, labels = heldout
    prompts = [f"a handwritten digit {d}" for d in labels[:16]]
    want = build_reward("digit_alignment", {"classifier_path": str(classifier_dir)})(images[:16], prompts)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("digit_alignment", "digit_alignment_bold", "combine"):
        options = {"components": [{"name": "digit_alignment"}]} if name == "combine" else {}
        got = build_reward(name, options, model_dir=str(model_dir))(images[:16], prompts)
        if name != "digit_alignment_bold":
            assert torch.equal(got, want), name
    acc = get_metric("digit_accuracy", model_dir=str(model_dir))(images, [f"digit {d}" for d in labels],
                                                                  torch.tensor(labels))
    assert acc > 0.9
    assert list(elsewhere.iterdir()) == []


def test_missing_classifier_is_a_clear_error(tmp_path):
    with pytest.raises(RewardError, match=f"no digits classifier in {tmp_path / 'base' / 'classifier'}"):
        build_reward("digit_alignment", model_dir=str(tmp_path / "base"))
    assert not (tmp_path / "base").exists()  # nothing trained or written on the way
    with pytest.raises(RewardError, match="needs the base model directory"):
        build_reward("digit_alignment")
    with pytest.raises(RewardError, match="needs the base model directory"):
        get_metric("digit_accuracy")(torch.rand(1, 3, 32, 32), ["digit 1"], torch.zeros(1))
    with pytest.raises(RewardError, match="'model_dir' is not an option"):
        build_reward("digit_alignment", {"model_dir": str(tmp_path)})
