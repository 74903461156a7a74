// Level meters: RMS of a MediaStream through an AnalyserNode, shown as a bar (0..100).

export class LevelMeter {
  private source: MediaStreamAudioSourceNode | null = null;
  private readonly analyser: AnalyserNode;
  private readonly buffer: Float32Array<ArrayBuffer>;
  private level = 0;

  constructor(
    private readonly ctx: AudioContext,
    private readonly element: HTMLElement,
  ) {
    this.analyser = ctx.createAnalyser();
    this.analyser.fftSize = 1024;
    this.buffer = new Float32Array(this.analyser.fftSize);
  }

  attach(stream: MediaStream): void {
    this.detach();
    this.source = this.ctx.createMediaStreamSource(stream);
    this.source.connect(this.analyser);
  }

  detach(): void {
    this.source?.disconnect();
    this.source = null;
    this.show(0);
  }

  /** Sample the current level; quick attack, slow release, on a dB scale from -60 to 0 dBFS. */
  update(): void {
    if (!this.source) return;
    this.analyser.getFloatTimeDomainData(this.buffer);
    let sum = 0;
    for (const x of this.buffer) sum += x * x;
    const rms = Math.sqrt(sum / this.buffer.length);
    const db = rms > 0 ? 20 * Math.log10(rms) : -100;
    const target = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
    this.level = target > this.level ? target : this.level * 0.85 + target * 0.15;
    this.show(this.level);
  }

  private show(level: number): void {
    const value = Math.round(level);
    this.element.style.setProperty("--level", `${value}%`);
    this.element.setAttribute("aria-valuenow", String(value));
    this.element.dataset.level = String(value);
    if (value > Number(this.element.dataset.peak ?? 0)) this.element.dataset.peak = String(value);
  }
}
