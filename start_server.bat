@echo off
REM Start the Qwen-Image server (Windows).
REM   start_server.bat
REM   set WORKERS=1 & set THREADS=4 & set PORT=5000 & start_server.bat
REM The first run creates .venv with pinned dependencies and builds the embedded tiny model.
REM Gunicorn does not run on Windows: the server runs under uvicorn with the same API.
setlocal
set "ROOT=%~dp0"
if not exist "%ROOT%.venv\Scripts\python.exe" (
  echo setting up %ROOT%.venv ^(first run: installs pinned dependencies, a few minutes^)
  python -m venv "%ROOT%.venv" || exit /b 1
)
if not exist "%ROOT%.venv\.installed" (
  "%ROOT%.venv\Scripts\python.exe" -m pip install --disable-pip-version-check -q -r "%ROOT%requirements.txt" -e "%ROOT%." || exit /b 1
  echo installed> "%ROOT%.venv\.installed"
)
"%ROOT%.venv\Scripts\qwen-image.exe" serve %*
