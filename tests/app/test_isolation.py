"""Every route that takes a conversation id, as listed by the OpenAPI document, is 404 to another owner.

tests/app/test_conversations.py checks a hand-written list of routes for API-key users and
browser sessions; this test reads the list from the app itself, so a route added later is
covered without anyone remembering to add it. It runs on SQLite and on PostgreSQL (``database_url``).
"""

from __future__ import annotations

from app_testing import parse_sse, running_client

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"


def body_for(method: str, path: str) -> dict | None:
    if method == "patch":
        return {"title": "mine now"}
    if method == "post":
        return {"content": "hi"} if path.endswith("/messages") else {}
    return None


def test_every_route_with_a_conversation_id_is_404_to_another_owner(make_settings, database_url):
    settings = make_settings(api_keys={"alice": ALICE, "bob": BOB}, classifier_enabled=False, database_url=database_url)
    with running_client(settings) as client:
        alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
        cid = client.post("/api/v1/conversations", json={"title": "alice's", "max_new_tokens": 4}, headers=alice).json()["id"]
        with client.stream("POST", f"/api/v1/conversations/{cid}/messages", json={"content": "secret"},
                           headers=alice) as response:
            answer_id = list(parse_sse(response.iter_lines()))[-1][1]["message"]["id"]
        before = client.get(f"/api/v1/conversations/{cid}", headers=alice).json()

        paths = client.get("/openapi.json").json()["paths"]
        routes = [(method, path) for path, operations in paths.items() if "{conversation_id}" in path
                  for method in operations]
        assert len(routes) >= 8, routes  # the seven conversation routes and the Lab's answer tokens
        for method, path in routes:
            url = path.replace("{conversation_id}", cid).replace("{message_id}", str(answer_id))
            response = client.request(method.upper(), url, json=body_for(method, path), headers=bob)
            assert response.status_code == 404, (method, path, response.status_code, response.text[:200])
            assert response.json() == {"detail": "conversation not found"}, (method, path)
            # The same request is not a 404 for the owner (so the 404 above is about ownership).
            if method == "get":  # (204: following an answer when none is being generated)
                assert client.get(url, headers=alice).status_code in (200, 204), path

        after = client.get(f"/api/v1/conversations/{cid}", headers=alice).json()
        assert after == before  # nothing bob sent changed, deleted or added anything
