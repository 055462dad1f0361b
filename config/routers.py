from rest_framework.routers import DefaultRouter

# Shared by small resources that live outside the apps' own routers (the audit log).
api_router = DefaultRouter(trailing_slash=True)
api_router.include_root_view = False
