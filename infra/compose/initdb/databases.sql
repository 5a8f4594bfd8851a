-- The stores of the team stack (infra/local/stack.py creates the same three).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
