"""FALCON's formulas against independent implementations, the crop box, and a planted concept end to end."""

import pytest
import torch
import torch.nn.functional as F

from course_utils.data.captions import caption_set
from course_utils.data.shapes import ShapesWorld
from course_utils.explain.falcon import (
    activation_threshold, caption_words, crop_box, explain_feature, highly_activating, lowly_activating, word_scores,
)


def test_caption_words_drop_stop_words_digits_and_the_discard_set():
    assert caption_words("A big red star, in the top-left (no. 3)!", discard=["big"]) == {"red", "star", "left"}


def test_word_scores_equal_an_independent_loop_of_eq_4_1():
    g = torch.Generator().manual_seed(0)
    captions = ["a red star", "a blue star", "a red ring on teal", "an old dog", "a teal ring", "red and blue"]
    confidence = torch.rand(7, len(captions), generator=g)
    scores = word_scores(confidence, captions, top_k=3)
    expected = {}
    for q in range(7):
        top = confidence[q].topk(3).indices.tolist()
        for w in {w for p in top for w in caption_words(captions[p])}:
            best = max(confidence[q, p].item() for p in top if w in caption_words(captions[p]))
            expected[w] = expected.get(w, 0.0) + best / 7
    assert scores.keys() == expected.keys()
    for w in expected:
        assert scores[w] == pytest.approx(expected[w])
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    with pytest.raises(ValueError, match="n_captions"):
        word_scores(confidence[:, :3], captions)


def test_highly_and_lowly_activating_follow_the_definitions():
    g = torch.Generator().manual_seed(1)
    H = torch.rand(200, 12, generator=g)
    H[:20, 4] += 3.0  # feature 4 is strong on the first 20 images
    normalised = F.normalize(H, dim=1)
    alpha = activation_threshold(H, k=2.0)
    high = highly_activating(H, 4, alpha)
    assert set(high.tolist()) == set((normalised[:, 4] > alpha).nonzero().flatten().tolist())
    assert (normalised[high, 4][:-1] >= normalised[high, 4][1:]).all()  # strongest first
    low = lowly_activating(H, 4, high, beta=0.3)
    others = [j for j in range(12) if j != 4]
    centre = normalised[high][:, others].mean(0)
    expected = {j for j in range(200) if normalised[j, 4] < normalised[:, 4].mean()
                and normalised[j, others] @ centre >= 0.3}
    assert set(low.tolist()) == expected and len(expected) > 0
    assert len(lowly_activating(H, 4, high, beta=0.3, max_images=3)) == 3
    with pytest.raises(ValueError, match="out of range"):
        highly_activating(H, 12, alpha)


def test_crop_box_is_the_box_of_the_largest_region_above_the_threshold():
    saliency = torch.zeros(10, 12)
    saliency[2:5, 3:9] = 1.0  # the large region
    saliency[8, 0] = 0.9  # a single hot pixel elsewhere
    assert crop_box(saliency) == (2, 3, 5, 9)
    assert crop_box(torch.zeros(4, 4)) == (0, 0, 4, 4)  # nothing salient: the whole image


class AttributeVLM:
    """A stand-in vision-language model: image and caption embeddings are indicator vectors of the
    attribute values they mention, so image-caption cosine counts shared concepts."""

    def __init__(self, world: ShapesWorld) -> None:
        self.vocabulary = sorted({v for key in ("shape", "color", "background_color") for v in world.attribute_names[key]})
        self.world = world

    def images(self) -> torch.Tensor:
        rows = torch.zeros(len(self.world), len(self.vocabulary))
        for key in ("shape", "color", "background_color"):
            for i, value in enumerate(self.world.attributes[key].tolist()):
                rows[i, self.vocabulary.index(self.world.attribute_names[key][value])] = 1
        return F.normalize(rows, dim=1)

    def texts(self, captions):
        rows = torch.zeros(len(captions), len(self.vocabulary))
        for i, caption in enumerate(captions):
            for word in caption_words(caption):
                if word in self.vocabulary:
                    rows[i, self.vocabulary.index(word)] = 1
        return F.normalize(rows, dim=1)


@pytest.fixture(scope="module")
def planted():
    """A representation whose feature 7 fires for red objects, the captions and the stand-in VLM."""
    world = ShapesWorld(n=600, seed=0)
    g = torch.Generator().manual_seed(0)
    H = torch.rand(len(world), 16, generator=g)
    red = world.attributes["color"] == world.attribute_names["color"].index("red")
    H[red, 7] += 4.0
    captions = caption_set(world.attribute_names, n=3000, seed=0)
    vlm = AttributeVLM(world)
    return world, H, red, captions, vlm


@pytest.mark.parametrize("contrastive", [False, True])
def test_a_planted_red_feature_is_named_red_first(contrastive, planted):
    world, H, red, captions, vlm = planted
    explanation = explain_feature(H, 7, vlm.images(), vlm.texts(captions), captions, contrastive=contrastive)
    assert explanation is not None and explanation.concepts[0] == "red"
    assert set(explanation.high.tolist()) <= set(red.nonzero().flatten().tolist())
    assert explain_feature(H, 7, vlm.images(), vlm.texts(captions), captions, min_images=10_000) is None


def test_failure_features_are_the_largest_contributions_to_the_predicted_class():
    from course_utils.explain.falcon import failure_features

    h = torch.tensor([1.0, 2.0, 0.5, 3.0])
    U = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 4.0, 0.5]])
    assert failure_features(h, U, predicted=1, top=2).tolist() == [2, 3]  # 2.0 and 1.5 beat 1.0 and -2.0


def test_transfer_recovers_a_planted_permutation_between_two_representations():
    from course_utils.explain.falcon import inherited_features, transfer_map

    g = torch.Generator().manual_seed(0)
    source = torch.rand(3000, 40, generator=g) ** 4  # sparse, positive, like ReLU features
    permutation = torch.randperm(40, generator=g)
    target = source[:, permutation] + 0.01 * torch.rand(3000, 40, generator=g)
    Z = transfer_map(target, source)  # SCIENCE.md: SGD, lr 1, 10 epochs; weights above mean + 4 std
    assert inherited_features(Z) == {t: [int(permutation[t])] for t in range(40)}


def test_true_concepts_and_precision_on_a_hand_made_case():
    from course_utils.explain.falcon import concept_precision, true_concepts

    world = ShapesWorld(n=800, seed=0)
    red = (world.attributes["color"] == world.attribute_names["color"].index("red")).nonzero().flatten()
    assert "red" in true_concepts(world.attributes, world.attribute_names, red)
    assert true_concepts(world.attributes, world.attribute_names, torch.arange(800)) == set()  # no enrichment
    scores = concept_precision([["red", "star"], ["blue"], ["ring", "teal"]], [{"red"}, {"teal"}, {"teal", "ring"}])
    assert scores["P@1"] == pytest.approx(2 / 3)
    assert scores["R@5"] == pytest.approx((1 + 0 + 1) / 3)
    assert scores["P@min(k,#true)"] == pytest.approx((1 + 0 + 1) / 3)


def test_synonyms_count_as_their_attribute_value_and_only_once():
    from course_utils.data.captions import concept_names
    from course_utils.explain.falcon import concept_precision

    names = concept_names(ShapesWorld(n=1, seed=0).attribute_names)
    assert names["hoop"] == {"ring"} and names["fading"] == {"gradient"} and names["plain"] == {"solid", "plain"}
    predicted, truths = [["hoop", "ring", "red"], ["disc"], ["teal"]], [{"ring", "red"}, {"circle"}, {"navy"}]
    plain = concept_precision(predicted, truths)
    with_synonyms = concept_precision(predicted, truths, names=names)
    assert plain["P@1"] == pytest.approx(0.0) and with_synonyms["P@1"] == pytest.approx(2 / 3)
    # "hoop" and "ring" name one value: the top two words find one of the two true concepts
    assert with_synonyms["P@min(k,#true)"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert with_synonyms["R@5"] == pytest.approx((2 / 2 + 1 + 0) / 3)


def test_the_bar_and_the_background_style_are_concepts_but_no_distractor_is_not():
    from course_utils.explain.falcon import true_concepts

    world = ShapesWorld(n=1000, seed=0, distractor_p=0.3)
    bar = (world.attributes["distractor"] == 1).nonzero().flatten()
    no_bar = (world.attributes["distractor"] == 0).nonzero().flatten()
    assert "bar" in true_concepts(world.attributes, world.attribute_names, bar)
    assert "none" not in true_concepts(world.attributes, world.attribute_names, no_bar)
    gradient = (world.attributes["background"] == world.attribute_names["background"].index("gradient")).nonzero()
    assert "gradient" in true_concepts(world.attributes, world.attribute_names, gradient.flatten())


class CornerEncoder(torch.nn.Module):
    """h_0 = mean red of the top half, h_1 = mean green of the left half: Grad-CAM of h_0 is the top half,
    of h_1 the left half, and only their intersection is the top-left quarter."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Identity()

    def forward(self, x):
        x = self.layer(x)
        side = x.shape[-1]
        return torch.stack([x[:, 0, : side // 2].mean((1, 2)), x[:, 1, :, : side // 2].mean((1, 2))], 1)


def test_gradcam_crops_zoom_into_where_the_feature_looks():
    from course_utils.explain.falcon import crop_box, gradcam_crops

    images = torch.zeros(2, 3, 16, 16)
    images[:, 0, :8] = 1.0  # red top half
    images[:, 1, :, :8] = 1.0  # green left half
    images[:, 2, :8, :8] = torch.linspace(0, 1, 8)  # a blue ramp in the top-left quarter, to see the zoom
    encoder = CornerEncoder()
    top_half = gradcam_crops(encoder, encoder.layer, images, 0)
    assert top_half.shape == images.shape and torch.allclose(top_half[:, 0], torch.ones(2, 16, 16))
    quarter = gradcam_crops(encoder, encoder.layer, images, [0, 1])  # intersection: the top-left quarter
    assert torch.allclose(quarter[:, 0], torch.ones(2, 16, 16)) and torch.allclose(quarter[:, 1], torch.ones(2, 16, 16))
    assert not torch.allclose(top_half[:, 1], torch.ones(2, 16, 16))  # the top half still shows non-green pixels
    assert crop_box(torch.ones(16, 16)) == (0, 0, 16, 16)
    with pytest.raises(ValueError, match="at least one feature"):
        gradcam_crops(encoder, encoder.layer, images, [])


def test_explain_feature_captions_the_given_high_embeddings_instead_of_the_whole_images(planted):
    world, H, red, captions, vlm = planted
    images, texts = vlm.images(), vlm.texts(captions)
    blue = vlm.texts(["blue"])[0]  # as if every crop showed only something blue
    seen = []

    def as_blue(high):
        seen.append(high)
        return blue.expand(len(high), -1)

    explanation = explain_feature(H, 7, images, texts, captions, contrastive=False, high_embeddings=as_blue)
    assert torch.equal(seen[0], explanation.high)
    assert explanation.scores["blue"] == max(explanation.scores.values()) and "red" not in explanation.scores


def test_feature_groups_follow_algorithm_1_of_the_thesis():
    from course_utils.explain.falcon import explainable_share, feature_groups, normalise

    g = torch.Generator().manual_seed(2)
    H = 0.05 + 0.01 * torch.rand(300, 10, generator=g)  # no feature stands out (normalised ≈ 0.32 each)
    H[:40, [2, 5]] += 3.0  # 40 images activate exactly {2, 5}
    H[40:70, 7] += 3.0  # 30 images activate exactly {7}
    H[70:75, 1] += 3.0  # too few images for a group
    embeddings = torch.randn(300, 6, generator=g)
    embeddings[:40] = torch.tensor([1.0, 0, 0, 0, 0, 0]) + 0.01 * embeddings[:40]  # the {2, 5} images look alike
    alpha = 0.5
    groups = feature_groups(H, embeddings, alpha, min_images=10, gamma=0.8)
    # independent: the exact active sets, counted
    active = normalise(H) > alpha
    counts = {}
    for row in active.tolist():
        key = tuple(i for i, on in enumerate(row) if on)
        if key:
            counts[key] = counts.get(key, 0) + 1
    assert {grp.features: len(grp.images) for grp in groups} == {k: v for k, v in counts.items() if v > 10}
    assert [grp.features for grp in groups] == [(2, 5), (7,)]  # largest first
    assert groups[0].interpretable and not groups[1].interpretable
    assert groups[0].similarity == pytest.approx(1.0, abs=1e-3)
    share = explainable_share(H, embeddings, groups, alpha, min_images=10, gamma=0.8)
    assert share["single features"] == pytest.approx(2 / 10)  # 2 and 5 fire on 40 alike images; 7 on unalike
    assert share["features in interpretable groups"] == pytest.approx(2 / 10)  # the group {2, 5}
    assert share["either"] == pytest.approx(2 / 10)
    embeddings[:20] = torch.tensor([0, 1.0, 0, 0, 0, 0])  # the {2, 5} images now fall into two looks
    groups = feature_groups(H, embeddings, alpha, min_images=10, gamma=0.8)
    assert explainable_share(H, embeddings, groups, alpha, gamma=0.8)["either"] == 0.0
    with pytest.raises(ValueError, match="one VLM embedding per image"):
        feature_groups(H, embeddings[:10], alpha)


def test_a_group_is_highly_active_only_where_all_its_features_are():
    H = torch.zeros(6, 4) + 0.1
    H[:3, 0] = 5.0
    H[1:4, 1] = 5.0
    both = highly_activating(H, [0, 1], alpha=0.5)
    assert sorted(both.tolist()) == [1, 2]
    low = lowly_activating(H, [0, 1], both, beta=-1.0)
    assert set(low.tolist()) == {4, 5}  # both features below their means
    with pytest.raises(ValueError, match="non-empty group"):
        highly_activating(H, [], alpha=0.5)


def test_evaluation_scores_a_planted_feature_and_the_frequency_baseline(planted):
    from course_utils.data.captions import concept_names
    from course_utils.explain.falcon import evaluate_features, frequency_concepts

    world, H, red, captions, vlm = planted
    images, texts = vlm.images(), vlm.texts(captions)
    result = evaluate_features(H, images, texts, captions, world.attributes, world.attribute_names,
                               concept_names(world.attribute_names))
    assert [e.feature for e in result.explanations] == [7]  # the only feature above α on > 10 images
    assert "red" in result.truths[0] and result.falcon["P@1"] == 1.0
    words = frequency_concepts(images[red], texts, captions)
    assert words[0] == "red"  # every retrieved caption of a red image mentions red


def test_templated_captions_name_every_attribute():
    from course_utils.data.captions import templated_caption_set

    names = ShapesWorld(n=1, seed=0).attribute_names
    captions = templated_caption_set(names, n=500, unrelated_share=0.2, seed=0)
    assert len(captions) == len(set(captions)) == 500
    templated = [c for c in captions if c.endswith(" background")]
    assert len(templated) == 400
    assert all(len(set(c.split()) & set(names["shape"])) == 1 and len(set(c.split()) & set(names["color"])) == 1
               for c in templated)


def test_evaluation_embeds_each_feature_once_and_its_baseline_counts_the_captions_falcon_retrieved(planted):
    from course_utils.data.captions import concept_names
    from course_utils.explain.falcon import evaluate_features, frequency_concepts

    world, H, red, captions, vlm = planted
    images, texts = vlm.images(), vlm.texts(captions)
    calls = []

    def seen(high):  # e.g. costly Grad-CAM crops: must run once per explained feature
        calls.append(high)
        return images[high]

    result = evaluate_features(H, images, texts, captions, world.attributes, world.attribute_names,
                               concept_names(world.attribute_names), high_embeddings=seen)
    assert len(calls) == len(result.explanations) == 1
    assert result.baseline[0] == frequency_concepts(images[result.explanations[0].high], texts, captions)
    assert result.explanations[0].high_captions.shape == (len(result.explanations[0].high), 5)


def test_concept_hits_are_the_per_feature_values_whose_means_are_concept_precision():
    from course_utils.explain.falcon import concept_hits, concept_precision

    predicted = [["red", "circle"], ["blue"], ["square", "green", "ring"], ["star"]]
    truths = [{"red"}, set(), {"green", "square"}, {"heart"}]
    hits = concept_hits(predicted, truths, k=5)
    assert hits["scored"].tolist() == [True, False, True, True]
    assert hits["P@1"].tolist() == [1.0, 1.0, 0.0]  # one value per scored feature, in input order
    assert hits["P@min(k,#true)"].tolist() == [1.0, 1.0, 0.0]
    summary = concept_precision(predicted, truths, k=5)
    for key in ("P@1", "P@min(k,#true)", "R@5"):
        assert summary[key] == hits[key].mean()


# --- Fidelity to the reference code (issue 18): confidences, discard rules, ε -----------------------------------

def _unit_captions(cosines):
    """One image [1, 2] and captions [M, 2] whose cosines to it are exactly ``cosines``."""
    import math

    image = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])
    return image, texts


def test_softmax_confidences_equal_a_hand_computation_over_every_candidate_caption():
    import math

    from course_utils.explain.falcon import caption_confidences

    cosines = [0.80, 0.75, 0.60]
    image, texts = _unit_captions(cosines)
    tau = 0.01
    partition = sum(math.exp(c / tau) for c in cosines)
    by_hand = [math.exp(c / tau) / partition for c in cosines]  # ≈ 0.993, 0.0067, 2e-9
    for chunk in (1, 2, 65_536):  # the normaliser is accumulated chunk by chunk
        values, indices = caption_confidences(image, texts, top_k=2, temperature=tau, chunk=chunk)
        assert indices.tolist() == [[0, 1]]
        # (here the third candidate is negligible; below it is not)
        assert values[0].tolist() == pytest.approx(by_hand[:2], rel=1e-5)
    close = [0.80, 0.79, 0.78]  # three near ties: the third candidate takes a third of the mass
    image, texts = _unit_captions(close)
    partition = sum(math.exp(c / tau) for c in close)
    values, _ = caption_confidences(image, texts, top_k=2, temperature=tau, chunk=1)
    assert values[0].tolist() == pytest.approx([math.exp(c / tau) / partition for c in close[:2]], rel=1e-5)
    raw, _ = caption_confidences(image, texts, top_k=2)
    assert raw[0].tolist() == pytest.approx(close[:2], rel=1e-6)  # temperature=None: the cosines themselves
    with pytest.raises(ValueError, match="temperature"):
        caption_confidences(image, texts, top_k=2, temperature=0.0)


def test_word_scores_with_a_temperature_weigh_each_caption_by_its_softmax_probability():
    import math

    captions = ["a red star", "a blue star", "a green ring"]
    cosines = torch.tensor([[0.80, 0.79, 0.78], [0.70, 0.75, 0.60]])
    tau = 0.01
    p = [[math.exp(c / tau) / sum(math.exp(x / tau) for x in row) for c in row] for row in cosines.tolist()]
    # eq. 4.1 by hand: per image the max probability of a caption containing the word, averaged over 2 images
    expected = {"red": (p[0][0] + p[1][0]) / 2, "blue": (p[0][1] + p[1][1]) / 2, "green": (p[0][2] + p[1][2]) / 2,
                "ring": (p[0][2] + p[1][2]) / 2, "star": (max(p[0][0], p[0][1]) + max(p[1][0], p[1][1])) / 2}
    scores = word_scores(cosines, captions, top_k=3, temperature=tau)
    assert scores.keys() == expected.keys()
    for w in expected:
        assert scores[w] == pytest.approx(expected[w], rel=1e-6)
    raw = word_scores(cosines, captions, top_k=3)
    assert raw["star"] == pytest.approx((0.80 + 0.75) / 2)  # temperature=None keeps the cosines
    # with raw cosines every retrieved word of an image weighs ≈ the same; with the softmax they do not
    assert raw["green"] / raw["red"] > 0.9 and scores["green"] / scores["red"] < 0.5


def test_discard_rules_of_the_contrastive_step_on_a_hand_built_example():
    from course_utils.explain.falcon import contrastive_discard

    low_scores = {"blue": 0.50, "star": 0.30, "dot": 0.12, "ring": 0.09, "red": 0.05}
    assert contrastive_discard(low_scores, "top", top_words=2) == ["blue", "star"]  # the course
    assert contrastive_discard(low_scores, "all", min_score=0.08) == ["blue", "star", "dot", "ring"]  # the thesis
    assert contrastive_discard(low_scores, "all", min_score=0.0) == list(low_scores)  # raw cosines: every word
    assert contrastive_discard(low_scores, "score") == ["blue", "star", "dot"]  # the reference: WS >= 0.1
    assert contrastive_discard(low_scores, "score", low_min_score=0.3) == ["blue", "star"]
    with pytest.raises(ValueError, match="rule must be one of"):
        contrastive_discard(low_scores, "most")


@pytest.mark.parametrize("rule", ["top", "all", "score"])
@pytest.mark.parametrize("temperature", [None, 0.01])
def test_explain_feature_removes_exactly_the_words_its_discard_rule_names(rule, temperature, planted):
    world, H, red, captions, vlm = planted
    images, texts = vlm.images(), vlm.texts(captions)
    e = explain_feature(H, 7, images, texts, captions, beta=0.3, low_discard=rule, temperature=temperature,
                        low_top_words=2, n_concepts=100)
    assert len(e.low) > 0 and e.low_scores
    min_score = 0.0 if temperature is None else 0.08  # the thesis' cut-off applies to softmax confidences
    expected = {"top": set(list(e.low_scores)[:2]),
                "all": {w for w, s in e.low_scores.items() if s >= min_score},
                "score": {w for w, s in e.low_scores.items() if s >= 0.1}}[rule]
    assert set(e.discarded) == expected
    assert e.concepts == [w for w, s in e.scores.items() if s >= min_score and w not in expected]


def test_eps_is_the_feature_mean_or_the_global_mean_of_the_normalised_activations():
    g = torch.Generator().manual_seed(3)
    H = torch.rand(300, 8, generator=g)
    H[:, 2] *= 0.2  # feature 2 is weak everywhere: its mean lies far below the global mean
    H[:30, 2] += 3.0
    normalised = F.normalize(H, dim=1)
    high = highly_activating(H, 2, alpha=0.5)
    others = [j for j in range(8) if j != 2]
    centre = normalised[high][:, others].mean(0)
    similar = normalised[:, others] @ centre >= 0.3

    def expected(eps):
        return {j for j in range(300) if normalised[j, 2] < eps and similar[j]}

    feature_mean, global_mean = normalised[:, 2].mean().item(), normalised.mean().item()
    by_feature = set(lowly_activating(H, 2, high, beta=0.3).tolist())
    assert by_feature == set(lowly_activating(H, 2, high, beta=0.3, eps="feature").tolist()) == expected(feature_mean)
    by_global = set(lowly_activating(H, 2, high, beta=0.3, eps="global").tolist())
    assert by_global == expected(global_mean) and by_global != by_feature
    assert set(lowly_activating(H, 2, high, beta=0.3, eps=0.05).tolist()) == expected(0.05)
    with pytest.raises(ValueError, match="eps must be"):
        lowly_activating(H, 2, high, eps="median")


@pytest.fixture(scope="module")
def committed_models():
    """The committed SimCLR encoder and toy CLIP on a val probe set built as notebook 05 builds it."""
    from course_utils.data.captions import concept_names, load_caption_set
    from course_utils.models import checkpoint_dir, load_pretrained
    from course_utils.simclr import extract_features
    from course_utils.vlm import caption_embeddings, load_toy_clip

    world = ShapesWorld(n=2000, size=32, seed=0, split="val", distractor_p=0.3)  # notebook 05 in quick mode
    encoder = load_pretrained("simclr-shapes-r10").encoder.eval()
    H, _ = extract_features(encoder, world, progress=False)
    clip = load_toy_clip(checkpoint_dir() / "vlm" / "shapes-clip.pt")
    captions = load_caption_set()
    return (world, H, clip.encode_images(world.images.float() / 255), caption_embeddings(clip, captions), captions,
            concept_names(world.attribute_names))


def test_falcon_with_the_committed_toy_clip_beats_word_counting_on_the_val_split(committed_models):
    from course_utils.explain.falcon import activation_threshold, concept_hits, evaluate_features
    from course_utils.stats import difference_interval

    world, H, images, texts, captions, names = committed_models
    result = evaluate_features(H, images, texts, captions, world.attributes, world.attribute_names, names,
                               alpha=activation_threshold(H, 3.0), beta=0.7, max_low=50, low_top_words=4)
    falcon_hits = concept_hits([e.concepts for e in result.explanations], result.truths, names=names)
    counting = concept_hits(result.baseline, result.truths, names=names)
    assert len(falcon_hits["P@1"]) >= 20  # enough explained features with a true concept to compare
    assert falcon_hits["P@1"].mean() >= 0.7  # the first concept is right for most features (measured: 0.85)
    # paired over the same features, FALCON's ranking beats word counting's (measured: +0.29 at P@1, +0.24 over
    # the top min(5, #true) words, 41 features); the bootstrap interval of the difference lies above 0
    for key in ("P@1", "P@min(k,#true)"):
        assert difference_interval(falcon_hits[key], counting[key], seed=0).above(0), key
