"""The OpenAPI schema says which errors each operation can answer with, all in the one error format."""
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from rest_framework.permissions import AllowAny

from .errors import ErrorSerializer

ERROR_DESCRIPTIONS = {
    "400": "Invalid input: the message names the field",
    "401": "No token, or an invalid or revoked one",
    "403": "Not allowed (for a browser session: missing CSRF token)",
    "404": "No such object for this user, or no such page",
    "409": "Conflicts with the object's state",
    "410": "The object's files are gone",
    "413": "The upload is larger than the server's limit",
    "415": "Unsupported content type",
    "429": "Too many requests; retry after details.retry_after seconds",
}


class AutoSchema(SpectacularAutoSchema):
    """Adds the error responses every operation can give, so the schema matches what the API really answers."""

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        codes = set(getattr(self.view, "error_statuses", ()))
        public = any(
            isinstance(p, type) and issubclass(p, AllowAny) for p in getattr(self.view, "permission_classes", ())
        )
        if not public:
            codes |= {"401", "403", "404"}
        query = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
        if "requestBody" in operation:
            codes |= {"400", "415"}
        if query:  # a malformed page_size or filter is a 400 too
            codes.add("400")
        if getattr(self.view, "throttle_classes", None):
            codes.add("429")
        if self.method in ("POST", "PUT", "PATCH") and not public:
            codes.add("400")  # a malformed or non-object JSON body
        error_ref = self.resolve_serializer(ErrorSerializer, "response").ref
        responses = operation.setdefault("responses", {})
        for code in sorted(codes):
            responses.setdefault(code, {
                "description": ERROR_DESCRIPTIONS.get(code, "Error"),
                "content": {"application/json": {"schema": error_ref}},
            })
        return operation
