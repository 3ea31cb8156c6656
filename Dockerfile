# syntax=docker/dockerfile:1
# mla-serve image: Node 20 slim, production dependencies, and the Vulkan loader Dawn (npm `webgpu`) drives the GPU through.
#
#   docker build -t mla-serve .
#   docker run --rm --gpus all -e NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
#     -p 8000:8000 -v mla-serve-data:/data mla-serve
#
# `graphics` in NVIDIA_DRIVER_CAPABILITIES is what makes the NVIDIA container toolkit mount the
# driver's Vulkan ICD (nvidia_icd.json + libGLX_nvidia.so.0); with only `compute,utility` Dawn finds
# no Vulkan GPU. If an older toolkit still leaves the ICD out, mount it by hand:
#   -v /usr/share/vulkan/icd.d/nvidia_icd.json:/etc/vulkan/icd.d/nvidia_icd.json:ro
#
# CPU-only hosts (slow, for trying it out): build with `--build-arg SWIFTSHADER=1`; Debian's chromium
# package carries SwiftShader's Vulkan driver, which the server falls back to by itself.
#
# Models: the default stories260K is read from /shared/models/stories260K when mounted there
# (`-v /path/to/shared:/shared:ro`; the server looks in ../shared from /app), else downloaded into
# HF_HOME=/data/huggingface on first start when online. Its MLA conversion is made on first start from
# the calibration text /shared/data/tinystories_valid_a.txt and cached in MLA_SERVE_CACHE=/data/mla-serve;
# without that text only the GQA model is served. Other models: mount a checkpoint and pass
# `serve --model /models/x --host 0.0.0.0` (arguments after the image name replace CMD).

FROM node:20-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM node:20-slim
ARG SWIFTSHADER=0
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvulkan1 ca-certificates \
 && if [ "$SWIFTSHADER" = "1" ]; then apt-get install -y --no-install-recommends chromium; fi \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV NODE_ENV=production \
    HF_HOME=/data/huggingface \
    MLA_SERVE_CACHE=/data/mla-serve
COPY --from=deps /app/node_modules ./node_modules
# The sources run through tsx (a production dependency): no build step.
COPY package.json tsconfig.json ./
COPY bin ./bin
COPY server ./server
COPY engine ./engine
COPY kernels ./kernels
COPY cache ./cache
COPY model ./model
COPY bench ./bench
# Run as node's unprivileged user; /data (the model cache) is made writable before it becomes a volume,
# since changes under a declared VOLUME are discarded.
RUN mkdir -p /data && chown node:node /data
VOLUME /data
EXPOSE 8000
USER node
ENTRYPOINT ["node", "bin/mla-serve.js"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
