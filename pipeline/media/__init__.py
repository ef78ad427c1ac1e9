"""Video and audio I/O through ffmpeg pipes: probe, decode frames and PCM, encode mp4, shift audio.

Written once and imported by preprocessing, generation and scoring. Every ffmpeg/ffprobe call goes
through ffmpeg-python; frames travel as raw RGB24 on a pipe and audio as float32 PCM on a pipe, so no
intermediate files are written except the temporary wav that `write_video` muxes.

Timeline conventions (what makes frame `i` and PCM sample `j` line up):
- ffmpeg shifts every file so that its earliest stream starts at t=0;
- `read_frames(fps=...)` resamples to a constant rate starting at t=0 (`fps=...:start_time=0`), so frame
  `i` shows time `i / fps` even when the video stream starts late;
- `read_audio` pads a late audio start with silence (`aresample=first_pts=0`), so sample `j` plays at
  `j / sample_rate`.
Paths may be local or any fsspec URI (`s3://...`); remote inputs are copied to a temporary file per call,
so wrap several calls on the same remote file in one `local_path`.

Which ffmpeg: `ffmpeg_executable()`. ffprobe is the system's.

Modules: `tools` (processes, errors, paths), `probing`, `decoding`, `encoding`; the public names are
re-exported here, so callers import from `pipeline.media`.
"""

from pipeline.media.decoding import SEEKABLE_FORMATS as SEEKABLE_FORMATS
from pipeline.media.decoding import FrameRangeReader as FrameRangeReader
from pipeline.media.decoding import ReadAhead as ReadAhead
from pipeline.media.decoding import container_format as container_format
from pipeline.media.decoding import i420_size as i420_size
from pipeline.media.decoding import iter_frames as iter_frames
from pipeline.media.decoding import read_audio as read_audio
from pipeline.media.decoding import read_frame_range as read_frame_range
from pipeline.media.decoding import read_frames as read_frames
from pipeline.media.decoding import remux_video as remux_video
from pipeline.media.decoding import shift_audio as shift_audio
from pipeline.media.encoding import STABILISERS as STABILISERS
from pipeline.media.encoding import mux_output as mux_output
from pipeline.media.encoding import resolve_stabiliser as resolve_stabiliser
from pipeline.media.encoding import video_with_new_audio as video_with_new_audio
from pipeline.media.encoding import write_i420 as write_i420
from pipeline.media.encoding import write_video as write_video
from pipeline.media.probing import ProbeInfo as ProbeInfo
from pipeline.media.probing import ffprobe_json as ffprobe_json
from pipeline.media.probing import probe as probe
from pipeline.media.tools import TOOL_KILLED as TOOL_KILLED
from pipeline.media.tools import FfmpegProcess as FfmpegProcess
from pipeline.media.tools import MediaError as MediaError
from pipeline.media.tools import check_exit as check_exit
from pipeline.media.tools import ffmpeg_executable as ffmpeg_executable
from pipeline.media.tools import ffmpeg_filters as ffmpeg_filters
from pipeline.media.tools import local_path as local_path
from pipeline.media.tools import read_exact as read_exact
from pipeline.media.tools import run_ffmpeg as run_ffmpeg
