from gateway import tokens
from gateway.relay import new_id


def test_a_token_round_trips_and_its_close_reason_fits_rfc6455():
    sid = new_id()
    token, th = tokens.new(sid)
    assert tokens.parse(token) == (sid, th)
    assert len(tokens.reason(token).encode()) <= 123
    assert tokens.new(sid)[0] != token


def test_anything_not_shaped_like_a_token_is_refused():
    for bad in ("", ".", "abc", "a" * 16, "sid.short", "s" * 16 + "." + "x" * 200, "s" * 16 + ".x y" + "z" * 20,
                "s" * 16 + "." + "z" * 22 + "\r\n", "../" + "s" * 16 + "." + "z" * 22):
        assert tokens.parse(bad) is None, bad
