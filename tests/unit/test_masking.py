"""Sensitive keys in payloads and results: which keys match, what is masked, how the list is set."""

from __future__ import annotations

import json

import pytest

from toolkit import errors, masking

SECRET = "s3cr3t-Vb7q"


def test_matching_keys_are_masked_at_any_depth_and_in_lists() -> None:
    m = masking.Masker()
    value = {"user": "bob", "password": SECRET, "db_password": SECRET,
             "nested": {"X-Api-Key": SECRET, "apiKey": SECRET, "list": [{"refresh_token": SECRET}]},
             "Authorization": {"scheme": "Bearer", "value": SECRET}, "count": 3,
             "items": [[{"SESSION_ID": SECRET}], "plain"]}
    out = m.mask(value)
    assert SECRET not in json.dumps(out)
    assert out["user"] == "bob" and out["count"] == 3 and out["items"][1] == "plain"
    assert out["password"] == masking.MASK and out["Authorization"] == masking.MASK
    assert out["nested"]["list"][0]["refresh_token"] == masking.MASK
    assert value["password"] == SECRET  # the argument is not changed


def test_json_text_is_masked_and_text_without_a_sensitive_key_is_returned_as_is() -> None:
    m = masking.Masker()
    plain = '{"customer": {"plan": "pro"}, "note": "no keys here"}'
    assert m.text(plain) is plain
    masked = m.text(json.dumps({"a": [{"token": SECRET}]}))
    assert SECRET not in masked and json.loads(masked) == {"a": [{"token": "***"}]}
    # a value that merely mentions a sensitive word is not a sensitive key
    text = json.dumps({"note": "reset the password"})
    assert json.loads(m.text(text)) == {"note": "reset the password"}
    assert m.text(None) is None and m.text("not json {") == "not json {"


def test_the_list_extends_the_defaults_and_a_minus_removes_one() -> None:
    keys = masking.sensitive_keys("ssn, -session", environ={})
    assert "ssn" in keys and "session" not in keys and "password" in keys
    assert masking.Masker(keys).mask({"SSN": 1, "session": 2}) == {"SSN": "***", "session": 2}
    from_env = masking.sensitive_keys(None, environ={masking.ENV_VAR: "customer_ref"})
    assert "customerref" in from_env and "password" in from_env
    assert masking.sensitive_keys(None, environ={}) == masking.sensitive_keys(
        masking.DEFAULT_SENSITIVE_KEYS, environ={})


@pytest.mark.parametrize("bad", ["--", "-nothere", 5, ["ok", 7], "__"])
def test_a_bad_list_is_a_configuration_error(bad: object) -> None:
    with pytest.raises(errors.ConfigurationError, match="sensitive_keys"):
        masking.sensitive_keys(bad, environ={})  # type: ignore[arg-type]


def test_the_vectorized_pattern_agrees_with_normalize() -> None:
    import random

    import pyarrow as pa
    import pyarrow.compute as pc

    m = masking.Masker(masking.sensitive_keys("ssn", environ={}))
    rng = random.Random(7)
    alphabet = 'tokenTOKEN_-. "{}:paswrdSsn\u212aé1'
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(20000)]
    texts += ['{"X-Api-Key": 1}', '{"a": {"Pass_Word": 2}}', '{"plan": "pro"}']
    vectorized = pc.match_substring_regex(pa.array(texts), masking.pattern(m.keys)).to_pylist()
    assert vectorized == [m.may_hold(t) for t in texts]
    assert vectorized[-3:] == [True, True, False]
