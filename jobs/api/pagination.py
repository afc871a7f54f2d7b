from rest_framework.pagination import PageNumberPagination


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 200

    def get_page_size(self, request):
        # A page_size that is not a positive whole number is an error naming it, not silently the default.
        raw = request.query_params.get(self.page_size_query_param)
        if raw is not None and not (raw.isdigit() and int(raw) > 0):
            from ..services import InputError

            raise InputError(f"page_size must be a whole number from 1 to {self.max_page_size}.", field="page_size")
        return super().get_page_size(request)
