"""The dashboard's panes and dialogs: the log (follow, search), the metrics plot, questions."""

from __future__ import annotations

from typing import ClassVar

from rich.highlighter import Highlighter
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Log

from fetchml.cli.tui.plot import WatchedMetrics, braille_lines, format_number, value_range

LOG_LINES = 5000  # lines of output kept on screen; older ones scroll away
Y_LABEL_WIDTH = 9  # characters of the plot's value axis


class SearchHighlighter(Highlighter):
    """Marks every occurrence of the search term (any case)."""

    def __init__(self) -> None:
        self.term = ""

    def highlight(self, text: Text) -> None:
        if self.term:
            text.highlight_words([self.term], "black on yellow", case_sensitive=False)


class LogPane(Log):
    """A job's output: follows new lines until scrolled away; searchable."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(max_lines=LOG_LINES, auto_scroll=True, highlight=True, id=id)
        self.marker = SearchHighlighter()
        self.highlighter = self.marker
        self.matches: list[int] = []
        self.match_at = -1

    @property
    def following(self) -> bool:
        return self.auto_scroll

    def set_following(self, follow: bool) -> None:
        self.auto_scroll = follow
        if follow:
            self.scroll_end(animate=False)

    def append(self, text: str) -> None:
        """Add output; the view follows it only while it is at the end (scrolling up to read
        holds it still, scrolling back down follows again)."""
        self.write(text, scroll_end=self.auto_scroll and self.is_vertical_scroll_end)

    def search(self, term: str) -> int:
        """Mark ``term`` and go to its last occurrence; returns how many lines have it."""
        self.marker.term = term
        self.notify_style_update()  # drop the rendered lines so the marks show
        self.refresh()
        wanted = term.lower()
        self.matches = [i for i, line in enumerate(self.lines) if wanted and
                        wanted in line.lower()]
        self.match_at = len(self.matches)
        if self.matches:
            self.next_match(-1)
        return len(self.matches)

    def next_match(self, step: int) -> int | None:
        """Go to the next (1) or previous (-1) matching line; returns its number."""
        if not self.matches:
            return None
        self.match_at = (self.match_at + step) % len(self.matches)
        line = self.matches[self.match_at]
        self.set_following(False)
        self.scroll_to(y=max(0, line - self.size.height // 2), animate=False)
        return line


class MetricsPlot(Widget):
    """The selected series of the watched job, as a braille line with its value range."""

    DEFAULT_CSS = """
    MetricsPlot { height: 1fr; min-height: 4; }
    """

    def __init__(self, metrics: WatchedMetrics, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.metrics = metrics

    @property
    def point_count(self) -> int:
        return len(self.metrics.points())

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        name = self.metrics.selected
        points = self.metrics.points()
        if name is None or not points:
            hint = ("no metrics yet: the job writes JSON lines such as\n"
                    '{"step": 1, "loss": 0.5} to $FETCHML_METRICS_FILE')
            return Text(hint if self.metrics.job_id is not None else "no job selected",
                        style="dim")
        step, value = points[-1]
        names = self.metrics.names()
        title = Text.assemble((name, "bold"), f" {format_number(value)} @ {step:g}",
                              (f"  {names.index(name) + 1}/{len(names)} m:next", "dim"))
        title.truncate(width)
        finite = [y for _, y in points if y == y and abs(y) != float("inf")]
        if not finite or height < 3:
            return title
        low, high = value_range(finite)
        plot_width = max(1, width - Y_LABEL_WIDTH)
        rows = braille_lines(points, plot_width, height - 2, (low, high))
        out = Text()
        out.append_text(title)
        for i, row in enumerate(rows):
            label = format_number(high) if i == 0 else (
                format_number(low) if i == len(rows) - 1 else "")
            out.append("\n" + label.rjust(Y_LABEL_WIDTH - 1)[:Y_LABEL_WIDTH - 1] + " ",
                       style="dim")
            out.append(row, style="green")
        first = format_number(points[0][0])
        last = format_number(step)
        axis = first + last.rjust(max(1, plot_width - len(first)))
        out.append("\n" + " " * Y_LABEL_WIDTH + axis, style="dim")
        return out


class ConfirmScreen(ModalScreen[bool]):
    """Asks before something that cannot be undone; y or Enter confirms, n or Esc does not."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: auto; max-width: 70; height: auto; padding: 1 2;
                               border: thick $warning; background: $surface; }
    ConfirmScreen Horizontal { height: auto; width: auto; margin-top: 1; }
    ConfirmScreen Button { margin-right: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PromptScreen(ModalScreen[str | None]):
    """Asks for one line of text; Enter answers, Esc gives None."""

    DEFAULT_CSS = """
    PromptScreen { align: center bottom; }
    PromptScreen > Vertical { height: auto; width: 100%; background: $surface;
                              padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "give_up", "cancel")]

    def __init__(self, label: str, value: str = "") -> None:
        super().__init__()
        self.label, self.value = label, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.label)
            yield Input(value=self.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_give_up(self) -> None:
        self.dismiss(None)
