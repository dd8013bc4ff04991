"""The rollout chain: batches, the rendered Heat template, gate names and pause hooks (pure, no Heat)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from imageupdate.heat import chain
from imageupdate.heat.chain import ChainSpec, batches, parse_gate, pause_hooks, render

NODES = ["node0", "node1", "node2", "node3", "node4"]
BEFORE = {n: "R1" for n in NODES}
OPTIONS = {"flavor": "small", "ports": [22]}


def spec(
    batch_list: list[list[str]],
    tag: str = "r7",
    nodes: list[str] | None = None,
    keep: dict[str, str] | None = None,
    previous: dict[str, Any] | None = None,
) -> ChainSpec:
    nodes = NODES if nodes is None else nodes
    changing = {n for b in batch_list for n in b}
    releases = {n: ("R2" if n in changing else "R1") for n in nodes}
    return ChainSpec(nodes, releases, batch_list, tag, 300, OPTIONS, keep or {}, previous or {})


# batches ----------------------------------------------------------------------------------------


def test_batches_without_canary_split_by_size_in_order() -> None:
    assert batches(NODES, 2, canary=False) == [["node0", "node1"], ["node2", "node3"], ["node4"]]
    assert batches(NODES, 1, canary=False) == [[n] for n in NODES]
    assert batches(NODES, 5, canary=False) == [NODES]
    assert batches(NODES, 50, canary=False) == [NODES]


def test_canary_is_a_first_batch_of_one() -> None:
    assert batches(NODES, 2, canary=True) == [["node0"], ["node1", "node2"], ["node3", "node4"]]
    assert batches(NODES, 10, canary=True) == [["node0"], ["node1", "node2", "node3", "node4"]]
    assert batches(["node0"], 3, canary=True) == [["node0"]]
    assert batches(["node0", "node1"], 1, canary=True) == [["node0"], ["node1"]]


@pytest.mark.parametrize("canary", [False, True])
def test_no_nodes_no_batches(canary: bool) -> None:
    assert batches([], 3, canary=canary) == []


def test_batches_do_not_change_their_input() -> None:
    nodes = list(NODES)
    batches(nodes, 2, canary=True)
    assert nodes == NODES


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_below_one_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        batches(NODES, size, canary=False)


# render: servers, gates, barriers -----------------------------------------------------------------


def test_template_header_and_outputs() -> None:
    t = render(spec([["node0"], ["node1", "node2"]]))
    assert t["heat_template_version"] == "2021-04-16"
    assert t["description"] == "imageupdate chain r7"
    assert t["outputs"]["tag"] == {"value": "r7"}
    assert t["outputs"]["releases"] == {
        "value": {"node0": "R2", "node1": "R2", "node2": "R2", "node3": "R1", "node4": "R1"}
    }


def test_one_server_per_node_with_name_release_options() -> None:
    t = render(spec([["node1"]]))
    res = t["resources"]
    for n in NODES:
        server = res[f"server_{n}"]
        assert server["type"] == "ImageUpdate::Server"
        assert server["properties"] == {"name": n, "release": "R2" if n == "node1" else "R1", "options": OPTIONS}


def test_exact_resources_for_a_canary_then_batch_of_two() -> None:
    t = render(spec([["node0"], ["node1", "node2"]]))
    expected = {f"server_{n}" for n in NODES} | {
        "gate_node0_r7",
        "gate_node0_r7_handle",
        "gate_node1_r7",
        "gate_node1_r7_handle",
        "gate_node2_r7",
        "gate_node2_r7_handle",
        "barrier_0",
        "barrier_1",
    }
    assert set(t["resources"]) == expected


def test_gates_wait_for_a_signal_on_their_handle_after_their_server() -> None:
    res = render(spec([["node0"], ["node3"]]))["resources"]
    for n in ("node0", "node3"):
        gate = res[f"gate_{n}_r7"]
        assert gate["type"] == "OS::Heat::WaitCondition"
        assert gate["depends_on"] == [f"server_{n}"]
        assert gate["properties"] == {"handle": {"get_resource": f"gate_{n}_r7_handle"}, "count": 1, "timeout": 300}
        assert res[f"gate_{n}_r7_handle"] == {"type": "OS::Heat::WaitConditionHandle"}


def test_unchanged_nodes_have_no_gate_and_no_dependency() -> None:
    res = render(spec([["node0"], ["node1", "node2"]]))["resources"]
    for n in ("node3", "node4"):
        assert "depends_on" not in res[f"server_{n}"]
        assert not [r for r in res if r.startswith(f"gate_{n}_")]


def test_servers_of_later_batches_wait_for_the_previous_barrier() -> None:
    res = render(spec([["node0"], ["node1", "node2"], ["node4"]]))["resources"]
    assert "depends_on" not in res["server_node0"]
    assert res["server_node1"]["depends_on"] == ["barrier_0"]
    assert res["server_node2"]["depends_on"] == ["barrier_0"]
    assert res["server_node4"]["depends_on"] == ["barrier_1"]


def test_first_batch_of_several_nodes_has_no_dependency() -> None:
    res = render(spec([["node0", "node1"], ["node2"]]))["resources"]
    assert "depends_on" not in res["server_node0"]
    assert "depends_on" not in res["server_node1"]
    assert res["server_node2"]["depends_on"] == ["barrier_0"]


def test_barriers_are_values_that_depend_on_their_batch_gates() -> None:
    bl = [["node0"], ["node1", "node2"], ["node4"]]
    res = render(spec(bl))["resources"]
    for k, b in enumerate(bl):
        barrier = res[f"barrier_{k}"]
        assert barrier["type"] == "OS::Heat::Value"
        assert barrier["depends_on"] == [f"gate_{n}_r7" for n in b]
        assert barrier["properties"]["type"] == "string"
    assert res["barrier_1"]["properties"]["value"] == "r7: batch 2 of 3 passed (node1, node2)"
    assert "barrier_3" not in res


def test_no_batches_renders_servers_only() -> None:
    res = render(spec([]))["resources"]
    assert set(res) == {f"server_{n}" for n in NODES}
    assert all("depends_on" not in r for r in res.values())


def test_the_tag_names_the_gates() -> None:
    res = render(spec([["node2"]], tag="r12"))["resources"]
    assert "gate_node2_r12" in res and "gate_node2_r12_handle" in res
    assert res["barrier_0"]["depends_on"] == ["gate_node2_r12"]
    assert not [r for r in res if r.endswith("_r7")]


# render: gates kept from the previous template -------------------------------------------------------


def previous_template() -> dict[str, Any]:
    """A stack's current template after an operation r3 that changed node3 and node4."""
    return render(spec([["node3"], ["node4"]], tag="r3"))


def test_kept_gates_are_copied_verbatim_from_previous() -> None:
    prev = previous_template()
    snapshot = copy.deepcopy(prev)
    res = render(spec([["node0"]], keep={"node3": "gate_node3_r3", "node4": "gate_node4_r3"}, previous=prev))[
        "resources"
    ]
    for kept in ("gate_node3_r3", "gate_node4_r3"):
        assert res[kept] == prev["resources"][kept]
        assert res[f"{kept}_handle"] == prev["resources"][f"{kept}_handle"]
    # the old gate of node4 keeps its old dependency text exactly, even though that names an old barrier
    assert res["gate_node4_r3"]["depends_on"] == ["server_node4"]
    # copies, not shared: changing the output leaves the previous template as it was
    res["gate_node3_r3"]["properties"]["count"] = 99
    assert prev == snapshot
    # the previous operation's barriers are not carried over
    assert set(r for r in res if r.startswith("barrier_")) == {"barrier_0"}


def test_kept_gate_absent_from_previous_is_dropped() -> None:
    prev = previous_template()
    res = render(spec([["node0"]], keep={"node3": "gate_node3_r2", "node1": "gate_node1_r3"}, previous=prev))[
        "resources"
    ]
    assert "gate_node3_r2" not in res and "gate_node3_r2_handle" not in res
    assert not [r for r in res if r.startswith("gate_node1_")]


def test_kept_gate_without_its_handle_in_previous_is_dropped() -> None:
    prev = previous_template()
    del prev["resources"]["gate_node3_r3_handle"]
    res = render(spec([["node0"]], keep={"node3": "gate_node3_r3"}, previous=prev))["resources"]
    assert "gate_node3_r3" not in res and "gate_node3_r3_handle" not in res


def test_kept_gates_with_no_previous_template_are_dropped() -> None:
    res = render(spec([["node0"]], keep={"node3": "gate_node3_r3"}))["resources"]
    assert not [r for r in res if r.startswith("gate_node3_")]


def test_a_changing_node_gets_a_fresh_gate_not_its_kept_one() -> None:
    prev = previous_template()
    res = render(spec([["node3"]], keep={"node3": "gate_node3_r3"}, previous=prev))["resources"]
    assert "gate_node3_r7" in res
    assert "gate_node3_r3" not in res and "gate_node3_r3_handle" not in res


def server_options(template: dict[str, Any], node: str) -> dict[str, Any]:
    return dict(template["resources"][f"server_{node}"]["properties"]["options"])


def test_a_node_brought_back_on_the_release_heat_holds_gets_a_changed_option() -> None:
    """A node that died on R2 and is brought back to R2: only a changed property makes Heat rebuild it."""
    prev = previous_template()  # node3 and node4 on R2
    assert server_options(prev, "node3") == OPTIONS
    res = render(spec([["node3"]], previous=prev))
    assert server_options(res, "node3") == OPTIONS | {chain.REBUILD_OPTION: "r7"}
    assert res["resources"]["server_node3"]["properties"]["release"] == "R2"


def test_a_node_left_alone_keeps_the_options_it_had_so_heat_does_not_rebuild_it() -> None:
    brought_back = render(spec([["node3"]], previous=previous_template()))
    later = render(spec([["node0"]], tag="r8", previous=brought_back))
    assert server_options(later, "node3") == OPTIONS | {chain.REBUILD_OPTION: "r7"}
    assert server_options(later, "node1") == OPTIONS


def test_a_node_changing_release_gets_the_plain_options() -> None:
    brought_back = render(spec([["node3"]], previous=previous_template()))
    back = ChainSpec(NODES, BEFORE, [["node3"]], "r9", 300, OPTIONS, {}, brought_back)
    assert server_options(render(back), "node3") == OPTIONS


def test_changed_site_options_reach_every_server() -> None:
    prev = render(spec([["node3"]], previous=previous_template()))
    moved = ChainSpec(NODES, {n: ("R2" if n in ("node3", "node4") else "R1") for n in NODES}, [], "r9", 300,
                      {"flavor": "large"}, {}, prev)
    assert {server_options(render(moved), n)["flavor"] for n in NODES} == {"large"}


# validate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "node 1", "a/b", "nöde", "x:y", "n\n"])
def test_bad_node_names_are_refused(bad: str) -> None:
    s = spec([["node0"]], nodes=["node0", bad])
    with pytest.raises(ValueError, match="cannot name a Heat resource"):
        s.validate()
    with pytest.raises(ValueError):
        render(s)


@pytest.mark.parametrize("bad", ["", "r 7", "r/7", "r7!"])
def test_bad_tags_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="tag"):
        render(spec([["node0"]], tag=bad))


@pytest.mark.parametrize(
    "bl",
    [
        [["node0"], ["node0"]],
        [["node1", "node1"]],
        [["node0"], ["node1", "node0"]],
    ],
)
def test_a_node_listed_twice_is_refused(bl: list[list[str]]) -> None:
    with pytest.raises(ValueError, match="once"):
        spec(bl).validate()


def test_a_changing_node_outside_the_fleet_is_refused() -> None:
    with pytest.raises(ValueError, match="fleet node"):
        spec([["node9"]], nodes=["node0", "node1"]).validate()


def test_valid_names_pass() -> None:
    s = spec([["web-1.a_b"]], nodes=["web-1.a_b", "node0"], tag="r1")
    s.validate()
    assert "gate_web-1.a_b_r1" in render(s)["resources"]


# parse_gate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [["node1", "node10"], ["node10", "node1"]])
def test_parse_gate_prefers_the_longest_node_name(nodes: list[str]) -> None:
    assert parse_gate("gate_node10_r7", nodes) == ("node10", "r7")
    assert parse_gate("gate_node1_r7", nodes) == ("node1", "r7")
    assert parse_gate("gate_node1_0_r7", nodes) == ("node1", "0_r7")


@pytest.mark.parametrize("nodes", [["web", "web_1"], ["web_1", "web"]])
def test_parse_gate_with_a_node_name_that_prefixes_another_with_underscore(nodes: list[str]) -> None:
    # node1/node10 cannot clash ("node1_" is no prefix of "node10_"); "web" and "web_1" can
    assert parse_gate("gate_web_1_r7", nodes) == ("web_1", "r7")
    assert parse_gate("gate_web_r7", nodes) == ("web", "r7")


@pytest.mark.parametrize(
    "name",
    [
        "gate_node1_r7_handle",
        "gate_node10_r7_handle",
        "server_node1",
        "barrier_0",
        "gate_node2_r7",
        "gate_node1",
        "node1_r7",
    ],
)
def test_parse_gate_returns_none_for_anything_else(name: str) -> None:
    assert parse_gate(name, ["node1", "node10"]) is None


def test_parse_gate_inverts_gate_name() -> None:
    for node in ("node1", "node10", "web-1.a"):
        assert parse_gate(chain.gate_name(node, "r42"), ["node1", "node10", "web-1.a"]) == (node, "r42")
        assert parse_gate(chain.handle_name(chain.gate_name(node, "r42")), ["node1", "node10", "web-1.a"]) is None


# pause_hooks --------------------------------------------------------------------------------------


def test_pause_hooks_on_servers_of_later_batches_only() -> None:
    hooks = pause_hooks([["node0"], ["node1", "node2"], ["node4"]])
    assert hooks == {
        "server_node1": {"hooks": ["pre-update"]},
        "server_node2": {"hooks": ["pre-update"]},
        "server_node4": {"hooks": ["pre-update"]},
    }


@pytest.mark.parametrize("bl", [[], [["node0", "node1"]]])
def test_no_pause_with_a_single_batch(bl: list[list[str]]) -> None:
    assert pause_hooks(bl) == {}
