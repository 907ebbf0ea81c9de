"""The edge router (a pure function: threshold edges, overrides, reasons with their numbers) and the department
taxonomy it reads (examples/taxonomy.yaml, matching, file errors with lines)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from runtime.common.yamldoc import InvalidFile
from runtime.edge.local_model import Draft
from runtime.edge.router import Decision, RouterConfig, confidence, route
from runtime.edge.taxonomy import Taxonomy, load_taxonomy, stem
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.unit

ENGINEERING = ["engineering"]


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy(EXAMPLES / "taxonomy.yaml")


def draft(probability: float, text: str = " Turn it slowly.") -> Draft:
    """A draft whose tokens have this geometric-mean probability (the router reads text and mean_logprob)."""
    lp = math.log(probability)
    return Draft(
        text=text,
        token_ids=(1, 2, 3),
        token_logprobs=(lp, lp, lp),
        mean_logprob=lp,
        prompt_tokens=10,
        prompt_tokens_evaluated=10,
        ttft_seconds=0.1,
        total_seconds=0.2,
        tokens_per_second=20.0,
        finish_reason="stop",
        cag_used=False,
    )


def decide(question: str = "How do I close valve VX-55?", **kw: object) -> Decision:
    args: dict[str, object] = {"device_departments": ENGINEERING, "draft": draft(0.8), "coverage": 0.7}
    args.update(kw)
    return route(question, **args)  # type: ignore[arg-type]


# --- confidence and θ ----------------------------------------------------------------------------------


def test_confident_in_scope_question_stays_local(taxonomy: Taxonomy) -> None:
    d = decide(taxonomy=taxonomy)
    assert d.route == "local" and not d.sensitive
    assert d.confidence == pytest.approx(0.5 * 0.8 + 0.5 * 0.7)
    assert d.token_probability == pytest.approx(0.8)
    assert d.codes == ["confident"]
    detail = d.reasons[0].detail
    for number in ("0.750", "0.450", "0.800", "0.700", "-0.223"):
        assert number in detail, detail
    assert d.departments_needed == ["engineering"] and d.departments_outside == []


def test_confidence_is_the_normalised_weighted_blend() -> None:
    config = RouterConfig(logprob_weight=3, coverage_weight=1)
    assert confidence(config, 0.2, 1.0) == pytest.approx((3 * 0.2 + 1 * 1.0) / 4)
    assert confidence(config, None, 1.0) == pytest.approx(0.25)
    same = RouterConfig(logprob_weight=2, coverage_weight=2)
    assert decide(config=same).confidence == decide(config=RouterConfig()).confidence


@pytest.mark.parametrize(
    ("coverage", "expected"),
    [(0.45, "local"), (math.nextafter(0.45, 0.0), "escalate"), (math.nextafter(0.45, 1.0), "local")],
)
def test_theta_edge(coverage: float, expected: str) -> None:
    # Coverage alone (logprob weight 0): confidence is exactly the coverage, so the edge is exact.
    config = RouterConfig(theta=0.45, logprob_weight=0, coverage_weight=1)
    d = decide(config=config, coverage=coverage)
    assert d.confidence == coverage
    assert d.route == expected
    assert d.codes == (["confident"] if expected == "local" else ["low-confidence"])


def test_low_confidence_escalates_with_the_numbers() -> None:
    d = decide(draft=draft(0.2), coverage=0.3, config=RouterConfig(theta=0.6))
    assert d.route == "escalate" and d.codes == ["low-confidence"]
    detail = d.reasons[0].detail
    assert "confidence 0.250 < θ 0.600" in detail
    assert "token probability 0.200" in detail and "mean logprob -1.609" in detail
    assert "coverage 0.300" in detail
    assert not d.reasons[0].overridden


def test_no_draft_escalates_even_when_coverage_alone_passes() -> None:
    d = decide(draft=None, coverage=1.0)
    assert d.confidence == pytest.approx(0.5)  # >= θ 0.45, yet there is no local answer to give
    assert d.route == "escalate" and d.codes == ["no-draft"]
    assert d.token_probability is None
    empty = decide(draft=draft(0.9, text="  \n"), coverage=1.0)
    assert empty.route == "escalate" and empty.codes == ["no-draft"]
    assert "empty" in empty.reasons[0].detail
    low = decide(draft=None, coverage=0.2)
    assert low.codes == ["no-draft", "low-confidence"]


# --- departments ---------------------------------------------------------------------------------------


def test_cross_department_escalates_naming_them(taxonomy: Taxonomy) -> None:
    d = decide("How many vacation days do employees get?", taxonomy=taxonomy, draft=draft(0.95), coverage=0.9)
    assert d.route == "escalate" and d.codes == ["cross-department"]
    assert d.departments_needed == ["hr"] and d.departments_outside == ["hr"]
    assert "hr (employee, vacation)" in d.reasons[0].detail
    assert "(engineering)" in d.reasons[0].detail


def test_mixed_departments_escalate_for_the_foreign_one(taxonomy: Taxonomy) -> None:
    d = decide("What discount may I give on a P-12 pump quote?", taxonomy=taxonomy)
    assert d.departments_needed == ["engineering", "sales"] and d.departments_outside == ["sales"]
    assert d.codes == ["cross-department"]
    both = decide(
        "What discount may I give on a P-12 pump quote?", taxonomy=taxonomy, device_departments=["engineering", "sales"]
    )
    assert both.route == "local" and both.departments_outside == []


def test_cross_department_and_low_confidence_are_both_listed(taxonomy: Taxonomy) -> None:
    d = decide("When is commission paid?", taxonomy=taxonomy, draft=draft(0.1), coverage=0.0)
    assert d.route == "escalate" and d.codes == ["low-confidence", "cross-department"]


def test_question_the_taxonomy_does_not_place_is_decided_by_confidence(taxonomy: Taxonomy) -> None:
    d = decide("Who won the snooker championship?", taxonomy=taxonomy)
    assert d.departments_needed == [] and d.route == "local"
    assert decide("Who won?", taxonomy=taxonomy, draft=draft(0.1), coverage=0.1).route == "escalate"


# --- sensitivity overrides -----------------------------------------------------------------------------


def test_sensitive_question_stays_local_despite_low_confidence() -> None:
    question = "Why was jane.doe@example.com locked out?"
    d = decide(question, draft=draft(0.05), coverage=0.0)
    assert d.route == "local" and d.sensitive
    assert d.codes == ["sensitive", "low-confidence"]
    assert d.reasons[0].detail.startswith("never leaves the device: email")
    assert d.reasons[1].overridden and "confidence 0.025 < θ 0.450" in d.reasons[1].detail
    assert "jane.doe" not in json.dumps(d.to_json())


def test_sensitive_question_stays_local_despite_cross_department(taxonomy: Taxonomy) -> None:
    d = decide(
        "Pay my vacation allowance to DE89 3704 0044 0532 0130 00", taxonomy=taxonomy, draft=draft(0.1), coverage=0.1
    )
    assert d.route == "local" and d.sensitive
    assert d.codes == ["sensitive", "low-confidence", "cross-department"]
    assert all(r.overridden for r in d.reasons[1:])
    assert "iban" in d.reasons[0].detail
    assert "DE89" not in json.dumps(d.to_json())


def test_local_only_chunks_keep_a_confident_answer_local_and_say_so() -> None:
    d = decide(chunk_labels=[["safety"], ["local-only"]])
    assert d.route == "local" and d.sensitive
    assert d.codes == ["sensitive", "confident"]
    assert not d.reasons[1].overridden
    assert "1 retrieved chunk labelled 'local-only'" in d.reasons[0].detail


def test_local_only_labels_from_the_caller_or_the_config(taxonomy: Taxonomy) -> None:
    hr_question = "How many vacation days do employees get?"
    labels = [["plant-secret"]]
    assert decide(hr_question, taxonomy=taxonomy, chunk_labels=labels).route == "escalate"
    by_arg = decide(hr_question, taxonomy=taxonomy, chunk_labels=labels, local_only_labels=["plant-secret"])
    assert by_arg.route == "local" and by_arg.sensitive
    config = RouterConfig(local_only_labels=("plant-secret",))
    assert decide(hr_question, taxonomy=taxonomy, chunk_labels=labels, config=config).route == "local"
    keyword = RouterConfig(local_only_keywords=("internal only",))
    assert decide(f"{hr_question} internal only", taxonomy=taxonomy, config=keyword).route == "local"


# --- the decision as data ------------------------------------------------------------------------------


def test_decision_to_json_is_plain_json_and_the_function_is_pure(taxonomy: Taxonomy) -> None:
    kw: dict[str, object] = {"taxonomy": taxonomy, "draft": draft(0.3), "coverage": 0.2, "chunk_labels": [["x"]]}
    first = decide("How many vacation days for password=hunter2?", **kw)
    assert decide("How many vacation days for password=hunter2?", **kw) == first
    data = json.loads(json.dumps(first.to_json()))
    assert data["route"] == "local" and data["sensitive"] is True
    assert data["confidence"] == pytest.approx(first.confidence) and data["theta"] == 0.45
    assert data["departments_needed"] == ["hr"] and data["departments_outside"] == ["hr"]
    assert [r["code"] for r in data["reasons"]] == ["sensitive", "low-confidence", "cross-department"]
    assert [r["overridden"] for r in data["reasons"]] == [False, True, True]
    assert data["findings"][0]["kind"] == "password"
    assert "hunter2" not in json.dumps(data)


@pytest.mark.parametrize("coverage", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_coverage_is_refused(coverage: float) -> None:
    with pytest.raises(ValueError, match="coverage must be a number in"):
        decide(coverage=coverage)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="no departments"):
        decide(device_departments=[])
    for bad in ({"theta": 0}, {"theta": 1}, {"theta": 1.2}, {"logprob_weight": -1}, {"nonsense": 1}):
        with pytest.raises(ValidationError):
            RouterConfig.model_validate(bad)
    with pytest.raises(ValidationError, match="cannot both be 0"):
        RouterConfig(logprob_weight=0, coverage_weight=0)


# --- the taxonomy --------------------------------------------------------------------------------------


def test_example_taxonomy_covers_the_example_departments(taxonomy: Taxonomy) -> None:
    rbac = YAML(typ="safe").load((EXAMPLES / "rbac.yaml").read_text())
    assert sorted(taxonomy.departments) == sorted(rbac["departments"])
    corpus = sorted(p.name for p in (EXAMPLES / "corpus").iterdir() if p.is_dir())
    assert sorted(taxonomy.departments) == corpus


def test_each_example_document_title_maps_to_its_own_department(taxonomy: Taxonomy) -> None:
    for path in sorted((EXAMPLES / "corpus").glob("*/*")):
        title = path.read_text().splitlines()[0].lstrip("# ")
        found = taxonomy.departments_for(title)
        assert path.parent.name in found, (path, title, found)


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("HOW DO I OPEN THE VALVE?", {"engineering": ["valve"]}),  # results in taxonomy order
        ("Which valves need bypass valves closed?", {"engineering": ["valve", "bypass valve"]}),
        ("Is a discounted deal possible?", {"sales": ["deal", "discount"]}),
        ("Who approves quoted prices from the price-book?", {"sales": ["price book", "quote"]}),
        ("Check vx 55 and p-12", {"engineering": ["VX-55", "P-12"]}),
        ("Can I carry over my holidays?", {"hr": ["holiday", "carry over"]}),
        ("What is the ideal temperature for pumpkins?", {}),  # word boundaries: not "deal", not "pump"
        ("Where is the seal?", {}),  # "mechanical seal" is a phrase: one of its words is not enough
    ],
)
def test_departments_for(taxonomy: Taxonomy, question: str, expected: dict[str, list[str]]) -> None:
    assert taxonomy.departments_for(question) == expected


def test_matches_name_the_topic(taxonomy: Taxonomy) -> None:
    found = {(m.department, m.topic, m.term) for m in taxonomy.matches("Is the sick leave of my buddy paid?")}
    assert found == {("hr", "leave", "sick leave"), ("hr", "onboarding", "buddy")}


def test_stem_reduces_inflections_alike() -> None:
    assert stem("policies") == stem("policy")
    assert stem("Pricing") == stem("price") == stem("priced") == stem("prices")
    assert stem("planning") == stem("plan")
    assert stem("processes") == stem("process")
    assert stem("status") == "status" and stem("analysis") == "analysis"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "taxonomy.yaml"
    path.write_text(text)
    return path


def test_a_term_shared_by_two_departments_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "departments:\n"
        "  sales:\n"
        "    keywords: [discount, quotes]\n"
        "  hr:\n"
        "    topics:\n"
        "      leave: [vacation, quote]\n",
    )
    with pytest.raises(InvalidFile) as err:
        load_taxonomy(path)
    (issue,) = err.value.issues
    assert issue.path == "departments.hr.topics.leave[1]"
    assert issue.line == 6
    assert "already a term of department 'sales'" in issue.message


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("departments:\n  Sales:\n    keywords: [quote]\n", "departments.Sales", "not a department name"),
        ("departments:\n  hr:\n    topics: {Leave: [vacation]}\n", "departments.hr.topics.Leave", "not a topic name"),
        ("departments:\n  sales:\n    keyword: [quote]\n", "departments.sales.keyword", "unknown key 'keyword'"),
        ("departments:\n  sales:\n    description: x\n", "departments.sales", "needs keywords or topics"),
        ("departments:\n  sales:\n    keywords: [quote, quotes]\n", "departments.sales.keywords[1]", "repeats item 0"),
        ("departments:\n  sales:\n    keywords: ['--']\n", "departments.sales.keywords[0]", "no letters or digits"),
        ("departments: {}\n", "departments", "at least 1 item"),
    ],
)
def test_bad_taxonomy_files(tmp_path: Path, text: str, path: str, message: str) -> None:
    with pytest.raises(InvalidFile) as err:
        load_taxonomy(_write(tmp_path, text))
    assert any(i.path == path and message in i.message for i in err.value.issues), err.value.message


def test_missing_taxonomy_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidFile, match="no such file"):
        load_taxonomy(tmp_path / "absent.yaml")
