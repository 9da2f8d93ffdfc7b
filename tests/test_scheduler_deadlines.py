"""Earliest deadline first among offline work, with the fake runner and latency model of
test_coserving_scheduler: no torch, milliseconds."""

from conserve.request import Request, RequestClass, RequestStatus
from conserve.sampling_params import SamplingParams
from conserve.sched.victims import choose_victim
from test_coserving_scheduler import OFFLINE, make, req, step


def offline(rid, deadline, prompt_len=8, max_tokens=4):
    r = req(rid, prompt_len, max_tokens, OFFLINE)
    r.deadline = deadline
    return r


def finish_order(sched, reqs):
    order = []
    while sched.has_unfinished():
        _, finished = step(sched)
        order += [r.request_id for r in finished]
    return order


def test_waiting_offline_requests_are_admitted_earliest_deadline_first():
    sched, _ = make(policy="priority", max_num_seqs=1)  # one at a time: admission order is finish order
    reqs = [offline("flex", None), offline("late", 200.0), offline("soon", 100.0), offline("late2", 200.0)]
    for r in reqs:
        sched.add_request(r)
    assert [r.request_id for r in sched.waiting] == ["soon", "late", "late2", "flex"]
    assert finish_order(sched, reqs) == ["soon", "late", "late2", "flex"]


def test_online_requests_still_come_before_any_deadline():
    sched, _ = make(policy="priority")
    sched.add_request(offline("soon", 1.0))
    sched.add_request(req("chat", 8, 4))
    assert [r.request_id for r in sched.waiting] == ["chat", "soon"]


def test_fcfs_has_no_classes_and_ignores_deadlines():
    sched, _ = make(policy="fcfs")
    for r in (offline("a", 200.0), offline("b", 100.0)):
        sched.add_request(r)
    assert [r.request_id for r in sched.waiting] == ["a", "b"]


def test_without_deadlines_arrival_order_is_kept():
    sched, _ = make(policy="priority", max_num_seqs=1)
    reqs = [offline(f"r{i}", None) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    assert finish_order(sched, reqs) == ["r0", "r1", "r2", "r3"]


def test_running_offline_work_is_planned_earliest_deadline_first():
    # A 48-token budget holds one 40-token prompt: the tighter deadline gets it, though it came second.
    sched, _ = make(policy="sarathi", token_budget=48)
    sched.add_request(offline("loose", 500.0, prompt_len=40))
    sched.add_request(offline("tight", 10.0, prompt_len=40))
    out, _ = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled][0] == ("tight", 40)


def test_conserve_policy_finishes_the_tighter_deadline_first_under_a_small_budget():
    sched, _ = make(max_offline_batched_tokens=24, max_num_batched_tokens=24)
    loose = [offline(f"loose{i}", 1000.0, prompt_len=20, max_tokens=6) for i in range(3)]
    tight = [offline(f"tight{i}", 10.0, prompt_len=20, max_tokens=6) for i in range(3)]
    for r in loose + tight:
        sched.add_request(r)
    order = finish_order(sched, loose + tight)
    assert sorted(order[:3]) == ["tight0", "tight1", "tight2"]


def test_victims_are_the_latest_deadline_first():
    running = [offline("soon", 1.0), offline("flex", None), offline("late", 9.0)]
    for i, r in enumerate(running):
        r.arrival_seq, r.status = i, RequestStatus.RUNNING
    chat = Request("chat", [1, 2], SamplingParams(max_tokens=2), request_class=RequestClass.ONLINE)
    assert choose_victim("conserve", chat, running, set()).request_id == "flex"
    assert choose_victim("conserve", chat, running, {"flex"}).request_id == "late"
    assert choose_victim("priority", running[0], running, {"flex"}).request_id == "late"
