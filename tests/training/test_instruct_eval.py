"""ROUGE-L by hand and the OpenAI-compatible judge against a real local HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from training.evaluate_instruct import JudgeError, cut_at_stop, judge_score, lcs_length, rouge_l


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a x c e".split()) == 3  # a c e
    # response: "the cat sat on the mat" (6), reference: "the cat is on the mat" (6); LCS the cat on the mat = 5
    score = rouge_l("The cat sat on the mat.", "the cat is on the mat")
    assert score["precision"] == pytest.approx(5 / 6) and score["recall"] == pytest.approx(5 / 6)
    assert score["f1"] == pytest.approx(5 / 6)
    # Different lengths: P = 2/2, R = 2/4, F1 = 2PR/(P+R) = 2/3.
    score = rouge_l("Paris, France", "The capital is Paris France")
    assert score["f1"] == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert rouge_l("", "")["f1"] == 1.0 and rouge_l("", "something")["f1"] == 0.0
    assert rouge_l("x y", "a b")["f1"] == 0.0


def test_cut_at_stop():
    assert cut_at_stop("Red.\n\n### Instruction:\nmore", ["\n\n### Instruction:", "\n\n### Response:"]) == "Red."
    assert cut_at_stop(" plain ", ["<|im_end|>"]) == "plain"


class Judge(BaseHTTPRequestHandler):
    answer = "Score: 85"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append((self.path, body))
        payload = json.dumps({"id": "x", "object": "chat.completion",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": Judge.answer}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_through_an_openai_compatible_endpoint(judge_url):
    record = {"instruction": "Name a color.", "input": "", "output": "Red.", "model_response": "Blue."}
    assert judge_score(record, judge_url, "llama3") == 85
    path, body = Judge.seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "llama3"
    prompt = body["messages"][0]["content"]
    assert "correct output `Red.`" in prompt and "score the model response `Blue.`" in prompt
    Judge.answer = "I cannot say"
    assert judge_score(record, judge_url, "llama3") is None
    Judge.answer = "Score: 85"


def test_unreachable_judge_is_a_clear_error():
    with pytest.raises(JudgeError, match="--judge-url http://127.0.0.1:9/v1: request to"):
        judge_score({"instruction": "a", "output": "b", "model_response": "c"}, "http://127.0.0.1:9/v1", "m", timeout=2)
