from shared.rewire import rewrite_text

MAP = {"127.80.0.1": "127.80.0.9", "127.80.0.10": "127.80.0.11"}


def test_rewrites_hosts_host_ports_and_urls():
    text = (
        "DATABASE_URL=postgresql://app:pw@127.80.0.1:5432/app\n"
        "CACHE_URL=redis://127.80.0.10:6379/0\n"
        "HOST=127.80.0.1\n"
    )
    out, counts = rewrite_text(text, MAP)
    assert out == (
        "DATABASE_URL=postgresql://app:pw@127.80.0.9:5432/app\n"
        "CACHE_URL=redis://127.80.0.11:6379/0\n"
        "HOST=127.80.0.9\n"
    )
    assert counts == {"127.80.0.1": 2, "127.80.0.10": 1}


def test_does_not_touch_longer_numbers_or_other_addresses():
    text = "a=127.80.0.100 b=1127.80.0.1 c=127.80.0.1.5 d=127.0.0.1 e=v127.80.0.1"
    out, counts = rewrite_text(text, MAP)
    assert out == text
    assert not counts


def test_single_pass_no_chains():
    out, _ = rewrite_text("x=10.0.0.1 y=10.0.0.2", {"10.0.0.1": "10.0.0.2", "10.0.0.2": "10.0.0.3"})
    assert out == "x=10.0.0.2 y=10.0.0.3"


def test_idempotent_second_run_changes_nothing():
    once, _ = rewrite_text("h=127.80.0.1:5432", MAP)
    twice, counts = rewrite_text(once, MAP)
    assert twice == once and not counts
