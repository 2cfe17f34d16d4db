# Server fixtures shared by several test folders (s3, s3_module, s3_session, mlflow_server, mlflow_server_module).
pytest_plugins = ["tests.helpers.s3", "tests.helpers.mlflow_server"]
